"""The HTTP/JSON API and the web page on the real stack: endpoints, errors equal to gRPC's, auth, the README's curl
examples as written, and a real headless Chromium driving the page.

The browser is Debian's `chromium`, driven over the DevTools protocol on `--remote-debugging-pipe` (two file
descriptors, NUL-separated JSON): no driver library, nothing downloaded, so it runs offline wherever the Debian
package installs (scripts/install-system-deps.sh). Playwright would need its own browser build or a download.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from imgsearch.client import GatewayClient
from imgsearch.devstack import GALLERY, Stack
from tests.harness import ServiceProcess, free_port, free_port_range
from tests.unit.test_http_api import HttpClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README_PORT = "http://127.0.0.1:50053"
TOKEN = "http-test-token"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("http-stack")
    s = Stack(state)
    base = free_port_range(20)
    metrics_base = free_port_range(20)
    with pytest.MonkeyPatch.context() as mp:
        # The stack's processes inherit this environment: the gateway serves HTTP on a free port.
        mp.setenv("IMGSEARCH_GATEWAY_HTTP_PORT", str(free_port()))
        specs = s.up(base, metrics_base, shards=2, timeout=300)
    try:
        gateway = next(x for x in specs if x.name == "gateway")
        assert s.index_gallery(gateway.address) == len(GALLERY)
        yield s
    finally:
        s.down()


def _gateway_spec(stack: Stack) -> Any:
    return next(x for x in stack.load() if x.name == "gateway")


@pytest.fixture(scope="module")
def http(stack: Stack) -> HttpClient:
    log = (stack.logs / "gateway.log").read_text()
    ports = re.findall(r'"page": "http://127\.0\.0\.1:(\d+)/"', log)
    assert ports, "the gateway did not log its HTTP address"
    return HttpClient(f"http://127.0.0.1:{ports[-1]}")


@pytest.fixture(scope="module")
def grpc_client(stack: Stack) -> Iterator[GatewayClient]:
    with GatewayClient(_gateway_spec(stack).address, timeout=60) as c:
        yield c


def gallery(stack: Stack, name: str) -> Path:
    return next((stack.state_dir / "gallery").glob(f"{name}.*"))


# ---- endpoints --------------------------------------------------------------------------------------------


def test_search_by_text_get_and_post(http: HttpClient) -> None:
    r = http.call("GET", "/v1/search/text?q=a+cup+of+coffee&k=5")
    assert r.status == 200 and r.body["hits"][0]["id"] == "coffee", r.body
    assert r.body["space"] == "semantic" and r.body["head"] and not r.body["partial"]
    assert r.body["hits"][0]["metadata"] == {"collection": "scikit-image samples"}
    post = http.call("POST", "/v1/search/text", json_body={"query": "a cup of coffee"})
    assert post.status == 200 and post.body["hits"][0]["id"] == "coffee"
    assert len(post.body["hits"]) == 10, "unset k means 10"


def test_upload_to_tag_and_search_by_image(stack: Stack, http: HttpClient) -> None:
    cat = gallery(stack, "cat").read_bytes()
    tags = http.call("POST", "/v1/tag", form=[("image", ("cat.png", cat)), ("k", "5")])
    assert tags.status == 200 and "cat" in [t["tag"] for t in tags.body["tags"]], tags.body
    assert tags.body["vocabulary_size"] > 0 and tags.body["head"]
    hits = http.call("POST", "/v1/search/image", form=[("image", ("cat.png", cat)), ("k", "3")])
    assert hits.status == 200 and hits.body["hits"][0]["id"] == "cat"
    assert hits.body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    similar = http.call("GET", "/v1/search/similar?id=astronaut&k=3")
    assert similar.status == 200 and "astronaut" not in [h["id"] for h in similar.body["hits"]]


def test_add_get_delete_images(stack: Stack, http: HttpClient, grpc_client: GatewayClient) -> None:
    form: list[tuple[str, str | tuple[str, bytes]]] = [
        ("image", ("coffee.png", gallery(stack, "coffee").read_bytes())),
        ("image", ("moon.png", gallery(stack, "moon").read_bytes())),
        ("image", ("junk.png", b"not an image")),
        ("id", "http-1"),
        ("id", "http-2"),
        ("id", "http-3"),
        ("meta", "album=web"),
    ]
    added = http.call("POST", "/v1/images", form=form)
    assert added.status == 200 and (added.body["added"], added.body["failed"]) == (2, 1), added.body
    assert [o["ok"] for o in added.body["results"]] == [True, True, False]
    assert added.body["results"][2]["code"] == "INVALID_ARGUMENT"
    got = http.call("GET", "/v1/images/http-1")
    assert got.status == 200 and got.body["metadata"] == {"album": "web"} and got.body["source_name"] == "coffee.png"
    # The same record over gRPC: one store, two front doors.
    assert grpc_client.get_images(["http-2"]).images[0].metadata == {"album": "web"}
    gone = http.call("DELETE", "/v1/images?id=http-1&id=http-2&id=http-3")
    assert gone.status == 200 and gone.body["deleted"] == 2
    assert [o["code"] for o in gone.body["results"]] == [None, None, "NOT_FOUND"]
    assert http.call("GET", "/v1/images/http-1").status == 404


def _grpc_details(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def test_bad_input_is_400_with_the_grpc_message(stack: Stack, http: HttpClient, grpc_client: GatewayClient) -> None:
    junk = b"\xff\xd8\xff\xe0" + b"garbage" * 20
    cases: list[tuple[Callable[[], object], str, str, Any]] = [
        (lambda: grpc_client.search_text("   "), "GET", "/v1/search/text?q=+++", None),
        (lambda: grpc_client.search_text("dogs", k=100000), "GET", "/v1/search/text?q=dogs&k=100000", None),
        (lambda: grpc_client.tag(junk), "POST", "/v1/tag", [("image", ("junk.jpg", junk))]),
        (lambda: grpc_client.delete_images([]), "DELETE", "/v1/images", None),
    ]
    for grpc_call, method, path, form in cases:
        code, details = _grpc_details(grpc_call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        r = http.call(method, path, form=form)
        assert r.status == 400, (path, r.body)
        assert r.body == {"error": {"code": "INVALID_ARGUMENT", "message": details}}, (path, r.body)
    code, details = _grpc_details(lambda: grpc_client.similar("no-such-image"))
    r = http.call("GET", "/v1/search/similar?id=no-such-image")
    assert code == grpc.StatusCode.NOT_FOUND and r.status == 404
    assert r.body == {"error": {"code": "NOT_FOUND", "message": details}}


def test_auth_failure_is_401_and_the_token_works(stack: Stack, tmp_path: Path) -> None:
    """A second gateway over the same peers, with public tokens: HTTP uses the gRPC server's token file."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    env = {
        k: v
        for k, v in _gateway_spec(stack).env.items()
        if not k.endswith(("_HOST", "_PORT")) or k == "IMGSEARCH_GATEWAY_HTTP_HOST"
    }
    port = free_port()
    env |= {"IMGSEARCH_GATEWAY_AUTH_TOKENS_FILE": str(tokens), "IMGSEARCH_GATEWAY_HTTP_PORT": str(port)}
    gw = ServiceProcess("gateway", env=env, log_path=tmp_path / "gateway-auth.log").start(timeout=120)
    try:
        anon = HttpClient(f"http://127.0.0.1:{port}")
        r = anon.call("POST", "/v1/tags", json_body={"tags": ["auth-test-tag"]})
        assert r.status == 401 and r.body["error"]["code"] == "UNAUTHENTICATED", r.body
        assert "Authorization: Bearer" in r.body["error"]["message"]
        wrong = HttpClient(f"http://127.0.0.1:{port}", "nope").call("DELETE", "/v1/images/cat")
        assert wrong.status == 401 and "not valid" in wrong.body["error"]["message"]
        assert anon.call("GET", "/v1/search/text?q=coffee&k=1").status == 200, "reads stay open"
        good = HttpClient(f"http://127.0.0.1:{port}", TOKEN)
        added = good.call("POST", "/v1/tags", json_body={"tags": ["auth-test-tag"]})
        assert added.status == 200 and added.body["results"][0]["ok"], added.body
        assert good.call("DELETE", "/v1/tags/auth-test-tag").status == 200
    finally:
        assert gw.stop() == 0, gw.log_tail()
    assert '"http stopped"' in (tmp_path / "gateway-auth.log").read_text(), "SIGTERM drains the HTTP server"


def test_metrics_port_answers_metrics_only(stack: Stack, http: HttpClient) -> None:
    metrics = HttpClient(f"http://127.0.0.1:{_gateway_spec(stack).metrics_port}")
    r = metrics.call("GET", "/metrics")
    assert r.status == 200 and "grpc_server_msg_received_total{" in r.body
    assert 'imgsearch_http_requests_total{code="200",method="GET",route="/v1/search/text"}' in r.body
    assert metrics.call("GET", "/").status == 404
    assert metrics.call("GET", "/anything").status == 404


def test_openapi_and_docs(http: HttpClient) -> None:
    doc = http.call("GET", "/openapi.json").body
    assert doc["info"]["title"] == "imgsearch" and "/v1/search/text" in doc["paths"]
    assert http.call("GET", "/docs").status == 200


# ---- the README's curl examples, as written ----------------------------------------------------------------


def readme_curl_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## HTTP API and web page", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [ln for b in blocks for ln in b.splitlines() if ln.startswith("curl ")]
    assert len(lines) >= 10, lines
    return lines


def test_readme_curl_examples_run_as_written(stack: Stack, http: HttpClient, tmp_path: Path) -> None:
    # The examples refer to var/stack/gallery/ relative to the checkout: give them this stack's gallery there.
    (tmp_path / "var" / "stack").mkdir(parents=True)
    (tmp_path / "var" / "stack" / "gallery").symlink_to(stack.state_dir / "gallery")
    for line in readme_curl_lines():
        command = line.replace(README_PORT, http.base)
        out = subprocess.run(
            ["bash", "-c", command + " -w '\\n%{http_code}'"], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        body, _, status = out.stdout.rpartition("\n")
        assert out.returncode == 0 and status == "200", (line, out.stdout, out.stderr)
        if " -o " in command:
            # A download: the file is the answer (the thumbnail example writes a JPEG).
            saved = Path(command.split(" -o ", 1)[1].split()[0])
            assert saved.read_bytes()[:3] == b"\xff\xd8\xff", line
            continue
        doc = json.loads(body)
        assert not isinstance(doc.get("error"), dict), (line, doc)
        if "search/text?q=a+cup+of+coffee" in line:
            assert doc["hits"][0]["id"] == "coffee"
        if "/v1/tag " in line + " ":
            assert "cat" in [t["tag"] for t in doc["tags"]]
        if "/v1/images?id=p1" in line and "DELETE" in line:
            assert doc["deleted"] == 2


# ---- a real browser ---------------------------------------------------------------------------------------


def chromium_binary() -> str:
    """Debian's chromium, installed by scripts/install-system-deps.sh when missing; skips only if that fails."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-system-deps.sh")], capture_output=True, text=True, timeout=900
    )
    if path := shutil.which("chromium"):
        return path
    pytest.skip(f"chromium is not installed and could not be installed: {(out.stderr or out.stdout).strip()[-500:]}")


class Browser:
    """Headless Chromium over the DevTools protocol on --remote-debugging-pipe (fd 3: commands, fd 4: replies)."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        # posix_spawn's dup2 is a no-op (and keeps close-on-exec) if the source already is 3 or 4.
        cmd_r, res_w = (os.dup(fd) if fd < 5 else fd for fd in (cmd_r, res_w))
        self._log = open(log, "wb")  # noqa: SIM115  (closed in close())
        args = [
            binary,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # tests run as root in CI
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "about:blank",
        ]
        self.pid = os.posix_spawn(
            binary,
            args,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, cmd_r, 3),
                (os.POSIX_SPAWN_DUP2, res_w, 4),
                (os.POSIX_SPAWN_DUP2, self._log.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, self._log.fileno(), 2),
            ],
        )
        os.close(cmd_r)
        os.close(res_w)
        self._next = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._res_r, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._cond.notify_all()

    def send(self, method: str, timeout: float = 30, session: bool = True, **params: Any) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: self._next in self._replies, timeout):
                raise TimeoutError(f"no reply to {method}; chromium log: {self._log.name}")
            reply = self._replies.pop(self._next)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.getElementById('query')", "the page to load")

    def js(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        error = self.js("document.getElementById('error').textContent")
        raise AssertionError(f"timed out waiting for {what}; page error: {error!r}; events: {self.errors()}")

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre."""
        box = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView(); "
            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def upload(self, selector: str, path: Path) -> None:
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def errors(self) -> list[Any]:
        return [e["params"] for e in self.events if e.get("method") == "Runtime.exceptionThrown"]

    def close(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, RuntimeError):
            self.send("Browser.close", session=False, timeout=10)
        deadline = time.monotonic() + 10
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.1)
        os.close(self._cmd_w)
        self._log.close()


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(chromium_binary(), tmp_path / "profile", tmp_path / "chromium.log")
    try:
        yield b
    finally:
        b.close()


def test_web_page_in_a_real_browser(stack: Stack, http: HttpClient, browser: Browser, tmp_path: Path) -> None:
    browser.open(http.base + "/")

    # A text search shows result tiles, each with its image.
    browser.type_into("#query", "a cup of coffee")
    browser.click("#text-form button")
    first = browser.wait(
        "(() => { const li = document.querySelectorAll('#results li'); const imgs = [...document.querySelectorAll("
        "'#results li img')]; return li.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) "
        "&& li[0].dataset.id; })()",
        "text search results with images",
    )
    assert first == "coffee"
    browser.screenshot(tmp_path / "text-search.png")

    # Picking a photo: its preview, its tags (some unseen after adding one), and similar images.
    browser.upload("#file", gallery(stack, "cat"))
    browser.wait("document.querySelectorAll('#tags li').length > 0", "the photo's tags")
    tags = browser.js("[...document.querySelectorAll('#tags li')].map(li => li.dataset.tag)")
    assert "cat" in tags, tags
    browser.wait(
        "document.getElementById('results-title').textContent.includes('cat.png') && "
        "document.querySelector('#results li') && document.querySelector('#results li').dataset.id === 'cat'",
        "images similar to the photo",
    )
    assert browser.js("document.getElementById('preview').naturalWidth") > 0

    # A new tag joins the live vocabulary and is ranked on the photo at once, marked unseen.
    browser.type_into("#new-tag", "whiskered feline")
    browser.click("#tag-form button")
    browser.wait(
        "!!document.querySelector('#tags li[data-tag=\"whiskered feline\"] .badge')", "the new unseen tag ranked"
    )

    # Clicking a result shows images similar to it.
    second = browser.js("document.querySelectorAll('#results li')[1].dataset.id")
    browser.click("#results li:nth-child(2)")
    browser.wait(
        f"document.getElementById('results-title').textContent === 'Images similar to {second}'"
        " && document.querySelectorAll('#results li').length > 0",
        "images similar to the clicked result",
    )
    assert second not in browser.js("[...document.querySelectorAll('#results li')].map(li => li.dataset.id)")
    browser.screenshot(tmp_path / "page.png")

    # A phone-sized screen: nothing wider than the viewport, two result columns.
    browser.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
    time.sleep(0.3)
    assert browser.js("document.documentElement.scrollWidth") <= 390
    columns = browser.js("getComputedStyle(document.getElementById('results')).gridTemplateColumns.split(' ').length")
    assert columns == 2
    browser.screenshot(tmp_path / "phone.png")
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert not browser.errors(), browser.errors()
    http.call("DELETE", "/v1/tags/" + urllib.parse.quote("whiskered feline"))
