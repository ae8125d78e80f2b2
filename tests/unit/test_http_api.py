"""HTTP/JSON API over the real servicer and Gateway core with in-memory peers, served by the real uvicorn server.

The client is the standard library's urllib (and a small multipart encoder), so what is tested is the bytes on
the wire: status codes, JSON bodies, error mapping, auth, limits, the OpenAPI document, the page.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from imgsearch.gateway.core import Gateway
from imgsearch.gateway.http import GRPC_TO_HTTP, HttpServer
from imgsearch.gateway.servicer import WRITE_METHODS, GatewayServicer
from imgsearch.kit.auth import auth_interceptor
from imgsearch.kit.convert import check_k
from imgsearch.kit.errors import ImgsearchError
from imgsearch.kit.metrics import start_metrics_server
from tests.fakes import FakeEncoder, FakeShard, FakeTagger, close_gateway, make_catalog, make_settings


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


def multipart(fields: Sequence[tuple[str, str | tuple[str, bytes]]]) -> tuple[bytes, str]:
    """multipart/form-data: (name, value) for text fields, (name, (filename, bytes)) for files."""
    boundary = "imgsearch" + secrets.token_hex(8)
    out = bytearray()
    for name, value in fields:
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data = value
            out += f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
            out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


class HttpClient:
    """Blocking JSON-over-HTTP calls with urllib; never raises for an HTTP error status."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        form: Sequence[tuple[str, str | tuple[str, bytes]]] | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        hdrs = dict(headers or {})
        data: bytes | None = raw
        if json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        elif form is not None:
            data, hdrs["Content-Type"] = multipart(form)
        if self.token:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, content, got = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            status, content, got = exc.code, exc.read(), dict(exc.headers)
        ctype = got.get("content-type", "")
        body: Any = json.loads(content) if "json" in ctype else content.decode("utf-8", "replace")
        return Reply(status, body, {k.lower(): v for k, v in got.items()})


@dataclass
class Served:
    gw: Gateway
    http: HttpServer
    shards: list[FakeShard]

    def client(self, token: str | None = None) -> HttpClient:
        return HttpClient(f"http://127.0.0.1:{self.http.port}", token)


TOKEN = "s3cret-token"


async def _serve(tmp_path: Path, auth: bool, **overrides: object) -> AsyncIterator[Served]:
    catalog = make_catalog(tmp_path)
    shards = [FakeShard(f"index-{i}") for i in range(2)]
    interceptor = None
    if auth:
        tokens = tmp_path / "tokens"
        tokens.write_text(f"# public tokens\n{TOKEN}\n")
        overrides["auth_tokens_file"] = tokens
        interceptor = auth_interceptor(tokens, False, WRITE_METHODS)
    settings = make_settings(tmp_path, shards, http_port=0, **overrides)
    gw = Gateway(settings, FakeEncoder(catalog.info, corrupt=frozenset({b"corrupt"})), FakeTagger(), shards)
    await gw.start(catalog=catalog)
    http = HttpServer(GatewayServicer(gw), interceptor)  # type: ignore[arg-type]
    await http.start()
    try:
        yield Served(gw, http, shards)
    finally:
        await http.stop()
        assert await close_gateway(gw)


@pytest.fixture()
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in _serve(tmp_path, auth=False, http_max_body_mb=1):
        yield s


@pytest.fixture()
async def served_auth(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in _serve(tmp_path, auth=True):
        yield s


async def call(client: HttpClient, *args: Any, **kwargs: Any) -> Reply:
    return await asyncio.to_thread(client.call, *args, **kwargs)


async def test_add_get_search_delete_round_trip(served: Served) -> None:
    c = served.client()
    added = await call(
        c,
        "POST",
        "/v1/images",
        form=[
            ("image", ("a.jpg", b"image a")),
            ("image", ("b.jpg", b"image b")),
            ("image", ("c.jpg", b"")),
            ("id", "a"),
            ("id", "b"),
            ("meta", "album=x"),
        ],
    )
    assert added.status == 200, added.body
    assert added.body["added"] == 3 - 1 and added.body["failed"] == 1
    ok, ok2, bad = added.body["results"]
    assert ok["id"] == "a" and ok["ok"] and ok2["id"] == "b"
    assert not bad["ok"] and bad["code"] == "INVALID_ARGUMENT" and "empty" in bad["error"]

    got = await call(c, "GET", "/v1/images/a")
    assert got.status == 200 and got.body["metadata"] == {"album": "x"} and got.body["source_name"] == "a.jpg"
    many = await call(c, "GET", "/v1/images?id=a&id=nope")
    assert [i["id"] for i in many.body["images"]] == ["a"] and many.body["missing_ids"] == ["nope"]

    hits = await call(c, "GET", "/v1/search/similar?id=a&include_self=true")
    assert hits.status == 200 and hits.body["hits"][0]["id"] == "a" and hits.body["space"] == "visual"
    text = await call(c, "POST", "/v1/search/text", json_body={"query": "a cup"})
    assert text.status == 200 and text.body["space"] == "semantic" and len(text.body["hits"]) == 3 - 1

    gone = await call(c, "DELETE", "/v1/images/a")
    assert gone.status == 200 and gone.body["ok"]
    again = await call(c, "DELETE", "/v1/images/a")
    assert again.status == 404 and again.body == {"error": {"code": "NOT_FOUND", "message": "image 'a' is not stored"}}
    missing = await call(c, "GET", "/v1/images/a")
    assert missing.status == 404 and missing.body["error"]["code"] == "NOT_FOUND"


def _core_message(fn: Any) -> str:
    try:
        fn()
    except ImgsearchError as exc:
        return exc.message
    raise AssertionError("no error")


async def test_errors_carry_the_core_message_and_a_mapped_status(served: Served, tmp_path: Path) -> None:
    c = served.client()
    empty = await call(c, "GET", "/v1/search/text?q=%20%20")
    assert empty.status == 400
    assert empty.body == {
        "error": {
            "code": "INVALID_ARGUMENT",
            "message": "query is empty: give a few words describing the images to find",
        }
    }
    # k=0 is the wire's "unset" (the default, 10), as over gRPC; below 0 or above max_k is refused.
    for k in ("-5", "100000", "99999999999"):
        r = await call(c, "GET", f"/v1/search/text?q=dogs&k={k}")
        assert r.status == 400, r.body
        assert r.body["error"]["message"] == _core_message(lambda k=k: check_k(int(k), 1000)), r.body
    not_int = await call(c, "GET", "/v1/search/text?q=dogs&k=ten")
    assert not_int.status == 400 and not_int.body["error"]["code"] == "INVALID_ARGUMENT"
    assert not_int.body["error"]["message"].startswith("k: ")
    unknown = await call(c, "GET", "/v1/search/similar?id=nope")
    assert unknown.status == 404 and unknown.body["error"]["message"] == "image 'nope' is not stored"
    no_image = await call(c, "POST", "/v1/search/image", form=[("k", "3")])
    assert no_image.status == 400 and no_image.body["error"]["message"] == "query image is empty (0 bytes)"
    corrupt = await call(c, "POST", "/v1/tag", form=[("image", ("x.jpg", b"corrupt"))])
    assert corrupt.status == 400 and corrupt.body["error"]["code"] == "INVALID_ARGUMENT"
    space = await call(c, "POST", "/v1/search/image", form=[("image", ("x.jpg", b"x")), ("space", "colour")])
    assert space.status == 400 and "space must be one of visual, semantic" in space.body["error"]["message"]
    no_ids = await call(c, "DELETE", "/v1/images")
    assert no_ids.status == 400 and no_ids.body["error"]["message"] == "no ids given"
    too_many = await call(c, "GET", "/v1/images?" + "&".join(f"id=i{i}" for i in range(1001)))
    assert too_many.status == 429 and too_many.body["error"]["code"] == "RESOURCE_EXHAUSTED"
    route = await call(c, "GET", "/v1/nothing-here")
    assert route.status == 404 and route.body["error"]["code"] == "NOT_FOUND"
    verb = await call(c, "PUT", "/v1/tags")
    assert verb.status == 405 and verb.body["error"]["code"] == "UNIMPLEMENTED"
    # curl, not urllib: the 413 comes before the body is read, and curl (Expect: 100-continue) reads it first.
    big_file = tmp_path / "big.jpg"
    big_file.write_bytes(b"x" * (2 * 1024 * 1024))
    out = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "-F", f"image=@{big_file}", f"{c.base}/v1/tag", "-w", "\\n%{http_code}"],
        capture_output=True,
        text=True,
        check=True,
    )
    body, _, status = out.stdout.rpartition("\n")
    assert status == "413" and json.loads(body)["error"]["code"] == "RESOURCE_EXHAUSTED", out.stdout
    deadline = await call(c, "GET", "/v1/search/text?q=dogs", headers={"X-Request-Timeout": "soon"})
    assert deadline.status == 400 and "X-Request-Timeout" in deadline.body["error"]["message"]


async def test_unset_k_means_ten(served: Served) -> None:
    c = served.client()
    form: list[tuple[str, str | tuple[str, bytes]]] = [("image", (f"{i}.jpg", f"img {i}".encode())) for i in range(14)]
    assert (await call(c, "POST", "/v1/images", form=form)).body["added"] == 14
    assert len((await call(c, "GET", "/v1/search/text?q=anything")).body["hits"]) == 10
    assert len((await call(c, "GET", "/v1/search/text?q=anything&k=3")).body["hits"]) == 3
    by_image = await call(c, "POST", "/v1/search/image", form=[("image", ("q.jpg", b"img 1"))])
    assert len(by_image.body["hits"]) == 10 and by_image.body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    await call(c, "POST", "/v1/tag", form=[("image", ("q.jpg", b"img 1"))])
    tagger = served.gw.tagger
    assert isinstance(tagger, FakeTagger) and tagger.rank_calls[-1].top_k == 10


async def test_writes_need_a_token_reads_do_not(served_auth: Served) -> None:
    anon = served_auth.client()
    wrong = served_auth.client("wrong")
    good = served_auth.client(TOKEN)
    form: list[tuple[str, str | tuple[str, bytes]]] = [("image", ("a.jpg", b"image a")), ("id", "a")]
    r = await call(anon, "POST", "/v1/images", form=form)
    assert r.status == 401 and r.body["error"]["code"] == "UNAUTHENTICATED"
    assert "requires a bearer token" in r.body["error"]["message"] and r.headers["www-authenticate"].startswith(
        "Bearer"
    )
    r = await call(wrong, "POST", "/v1/tags", json_body={"tags": ["feline"]})
    assert r.status == 401 and r.body["error"]["message"].endswith("the bearer token is not valid")
    assert (await call(wrong, "DELETE", "/v1/images/a")).status == 401
    # As in gRPC, the token is checked before the request's content: a bad write without a token is 401, not 400.
    assert (await call(anon, "POST", "/v1/images", form=[("id", "x")])).status == 401
    assert (
        await call(anon, "POST", "/v1/tags", raw=b"{not json", headers={"Content-Type": "application/json"})
    ).status in (
        401,
        400,
    )
    assert (await call(wrong, "POST", "/v1/heads/activate", json_body={"head": "lin-b"})).status == 401
    assert (await call(good, "POST", "/v1/images", form=form)).status == 200
    assert (await call(anon, "GET", "/v1/images/a")).status == 200
    assert (await call(anon, "GET", "/v1/search/text?q=x")).status == 200


async def test_heads_tags_openapi_page_and_health(served: Served) -> None:
    c = served.client()
    heads = await call(c, "GET", "/v1/heads")
    assert heads.status == 200 and heads.body["active"].startswith("lin-a")
    assert {h["name"] for h in heads.body["heads"]} >= {"lin-a", "lin-b"}
    switch = await call(c, "POST", "/v1/heads/activate", json_body={"head": "lin-b"})
    assert switch.status == 200 and switch.body["head"]["name"] == "lin-b"
    bad_head = await call(c, "POST", "/v1/heads/activate", json_body={"head": "../etc/passwd"})
    assert bad_head.status in (400, 404) and bad_head.body["error"]["code"] in ("INVALID_ARGUMENT", "NOT_FOUND")
    assert (await call(c, "GET", "/v1/tags?filter=unseen")).status == 200
    bad_filter = await call(c, "GET", "/v1/tags?filter=odd")
    assert bad_filter.status == 400 and "tag filter must be one of" in bad_filter.body["error"]["message"]
    assert (await call(c, "POST", "/v1/tags", json_body={"tags": ["feline"]})).status == 200

    doc = (await call(c, "GET", "/openapi.json")).body
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path, verbs in {
        "/v1/search/text": {"get", "post"},
        "/v1/search/image": {"post"},
        "/v1/search/similar": {"get"},
        "/v1/tag": {"post"},
        "/v1/tags": {"get", "post", "delete"},
        "/v1/tags/{tag}": {"delete"},
        "/v1/images": {"get", "post", "delete"},
        "/v1/images/{image_id}": {"get", "delete"},
        "/v1/heads": {"get"},
        "/v1/heads/activate": {"post"},
    }.items():
        assert verbs <= set(paths[path]), (path, set(paths[path]))
    page = await call(c, "GET", "/")
    assert page.status == 200 and "<title>imgsearch</title>" in page.body and "https://" not in page.body
    docs = await call(c, "GET", "/docs")
    assert docs.status == 200 and "/openapi.json" in docs.body
    for asset in ("app.js", "style.css"):
        r = await call(c, "GET", f"/static/{asset}")
        assert r.status == 200 and "//cdn" not in r.body and "https://" not in r.body
    assert (await call(c, "GET", "/healthz")).body == {"status": "SERVING"}


def test_every_grpc_status_has_an_http_status() -> None:
    assert set(GRPC_TO_HTTP) == set(grpc.StatusCode)
    assert GRPC_TO_HTTP[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert GRPC_TO_HTTP[grpc.StatusCode.UNAUTHENTICATED] == 401
    assert GRPC_TO_HTTP[grpc.StatusCode.PERMISSION_DENIED] == 403
    assert GRPC_TO_HTTP[grpc.StatusCode.NOT_FOUND] == 404
    assert GRPC_TO_HTTP[grpc.StatusCode.UNAVAILABLE] == 503
    assert GRPC_TO_HTTP[grpc.StatusCode.DEADLINE_EXCEEDED] == 504
    assert GRPC_TO_HTTP[grpc.StatusCode.INTERNAL] == 500


def test_metrics_port_serves_metrics_only() -> None:
    port = start_metrics_server("127.0.0.1", 0)
    c = HttpClient(f"http://127.0.0.1:{port}")
    r = c.call("GET", "/metrics")
    assert r.status == 200 and "grpc_server_msg_received_total" in r.body and "grpc_server_msg_sent_total" in r.body
    assert c.call("GET", "/metrics/").status == 200
    for path in ("/", "/favicon.ico", "/metricsx", "/debug"):
        assert c.call("GET", path).status == 404, path
