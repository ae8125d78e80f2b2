"""Bearer-token interceptor against a real grpc.aio server run by the kit's Runner on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from imgsearch.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imgsearch.gateway.servicer import WRITE_METHODS as GATEWAY_WRITE_METHODS
from imgsearch.kit.auth import (
    BearerTokenInterceptor,
    TokenFileError,
    TokenStore,
    auth_interceptor,
    bearer_token,
    parse_tokens,
)
from imgsearch.kit.server import Runner, ServiceApp, methods_of
from imgsearch.kit.settings import ServerSettings

GATEWAY = "imgsearch.gateway.v1.GatewayService"
GOOD = "s3cret-token-one"
OTHER_GOOD = "second-token"


class EchoGateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Just enough of the public API to see whether a call reached its handler."""

    async def AddImages(
        self, request_iterator: AsyncIterator[gateway_pb2.AddImagesRequest], context: Any
    ) -> gateway_pb2.AddImagesResponse:
        n = 0
        async for _ in request_iterator:
            n += 1
        return gateway_pb2.AddImagesResponse(added=n)

    async def DeleteImages(
        self, request: gateway_pb2.DeleteImagesRequest, context: Any
    ) -> gateway_pb2.DeleteImagesResponse:
        return gateway_pb2.DeleteImagesResponse(deleted=len(request.ids))

    async def SearchByText(
        self, request: gateway_pb2.SearchByTextRequest, context: Any
    ) -> gateway_pb2.SearchByTextResponse:
        return gateway_pb2.SearchByTextResponse(meta=gateway_pb2.SearchMeta(shards_total=request.k))


def tokens_file(tmp_path: Path, *tokens: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# rotated by the Secret\n\n" + "\n".join(f"  {t}  " for t in tokens) + "\n")
    return path


async def start_gateway(interceptor: aio.ServerInterceptor | None) -> Runner:
    app = ServiceApp(
        name="authtest",
        service_names=[GATEWAY],
        # The other methods stay the generated base's UNIMPLEMENTED: these tests never call them.
        register=lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            EchoGateway(),  # type: ignore[abstract]
            server,
        ),
        methods=methods_of(gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]),
        interceptors=[interceptor] if interceptor else [],
    )
    runner = Runner(app, ServerSettings(port=0, metrics_port=0))
    await runner.start()
    await runner.load()
    return runner


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def denied(method: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "imgsearch_auth_denied_total", {"grpc_method": f"/{GATEWAY}/{method}", "reason": reason}
    )
    return value or 0.0


def handled(method: str, code: str) -> float:
    labels = {"grpc_service": GATEWAY, "grpc_method": method, "grpc_type": "unary", "grpc_code": code}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


async def add_images(
    stub: gateway_pb2_grpc.GatewayServiceAsyncStub, n: int, **kw: Any
) -> gateway_pb2.AddImagesResponse:
    async def requests() -> AsyncIterator[gateway_pb2.AddImagesRequest]:
        for i in range(n):
            yield gateway_pb2.AddImagesRequest(id=f"img-{i}", image=b"x")

    return await stub.AddImages(requests(), timeout=5, **kw)


@pytest.fixture()
async def writes_only(tmp_path: Path) -> AsyncIterator[gateway_pb2_grpc.GatewayServiceAsyncStub]:
    interceptor = auth_interceptor(
        tokens_file(tmp_path, GOOD, OTHER_GOOD), require_for_reads=False, write_methods=GATEWAY_WRITE_METHODS
    )
    runner = await start_gateway(interceptor)
    async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as ch:
        yield gateway_pb2_grpc.GatewayServiceStub(ch)
    await runner.drain()


async def test_write_without_token_is_unauthenticated_with_a_clear_message(
    writes_only: gateway_pb2_grpc.GatewayServiceAsyncStub,
) -> None:
    before = denied("DeleteImages", "missing")
    with pytest.raises(aio.AioRpcError) as err:
        await writes_only.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=["a"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in (err.value.details() or "")
    assert denied("DeleteImages", "missing") == before + 1


async def test_write_with_wrong_token_is_unauthenticated(writes_only: gateway_pb2_grpc.GatewayServiceAsyncStub) -> None:
    before = denied("AddImages", "invalid")
    with pytest.raises(aio.AioRpcError) as err:
        await add_images(writes_only, 2, metadata=bearer(GOOD + "x"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid" in (err.value.details() or "")
    assert denied("AddImages", "invalid") == before + 1
    # Another scheme with the right secret is still no bearer token.
    with pytest.raises(aio.AioRpcError) as err:
        await writes_only.DeleteImages(
            gateway_pb2.DeleteImagesRequest(ids=["a"]), timeout=5, metadata=(("authorization", f"Basic {GOOD}"),)
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_every_listed_token_is_accepted_on_writes(writes_only: gateway_pb2_grpc.GatewayServiceAsyncStub) -> None:
    for token in (GOOD, OTHER_GOOD):
        resp = await add_images(writes_only, 3, metadata=bearer(token))
        assert resp.added == 3
    before = handled("DeleteImages", "OK")
    resp2 = await writes_only.DeleteImages(
        gateway_pb2.DeleteImagesRequest(ids=["a", "b"]), timeout=5, metadata=(("authorization", f"bearer {GOOD}"),)
    )
    assert resp2.deleted == 2
    # The call passed through the metrics interceptor behind the auth one.
    assert handled("DeleteImages", "OK") == before + 1


async def test_reads_open_when_only_writes_need_a_token(writes_only: gateway_pb2_grpc.GatewayServiceAsyncStub) -> None:
    resp = await writes_only.SearchByText(gateway_pb2.SearchByTextRequest(query="cat", k=7), timeout=5)
    assert resp.meta.shards_total == 7


async def test_reads_need_a_token_when_configured_but_health_and_reflection_stay_open(tmp_path: Path) -> None:
    runner = await start_gateway(
        auth_interceptor(tokens_file(tmp_path, GOOD), require_for_reads=True, write_methods=GATEWAY_WRITE_METHODS)
    )
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            with pytest.raises(aio.AioRpcError) as err:
                await stub.SearchByText(gateway_pb2.SearchByTextRequest(query="cat", k=1), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = await stub.SearchByText(
                gateway_pb2.SearchByTextRequest(query="cat", k=1), timeout=5, metadata=bearer(GOOD)
            )
            assert ok.meta.shards_total == 1

            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=GATEWAY), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            refl = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            names = set()
            async for answer in refl.ServerReflectionInfo(ask(), timeout=5):
                names |= {s.name for s in answer.list_services_response.service}
            assert GATEWAY in names
    finally:
        await runner.drain()


async def test_rotated_tokens_file_takes_effect_without_restart(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, GOOD)
    store = TokenStore(path, recheck_seconds=0.0)
    runner = await start_gateway(BearerTokenInterceptor(store, False, GATEWAY_WRITE_METHODS))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            req = gateway_pb2.DeleteImagesRequest(ids=["a"])
            assert (await stub.DeleteImages(req, timeout=5, metadata=bearer(GOOD))).deleted == 1
            # Kubelet swaps the Secret's files atomically: write aside, rename over.
            staged = tmp_path / "tokens.new"
            staged.write_text("rotated-token\n")
            staged.replace(path)
            assert (await stub.DeleteImages(req, timeout=5, metadata=bearer("rotated-token"))).deleted == 1
            with pytest.raises(aio.AioRpcError) as err:
                await stub.DeleteImages(req, timeout=5, metadata=bearer(GOOD))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A rotation caught empty keeps the last good tokens rather than locking everyone out.
            staged.write_text("# nothing yet\n")
            staged.replace(path)
            assert (await stub.DeleteImages(req, timeout=5, metadata=bearer("rotated-token"))).deleted == 1
    finally:
        await runner.drain()


def test_no_tokens_file_means_no_interceptor_unless_reads_must_authenticate() -> None:
    assert auth_interceptor(None, require_for_reads=False, write_methods=GATEWAY_WRITE_METHODS) is None
    with pytest.raises(TokenFileError, match="no tokens file"):
        auth_interceptor(None, require_for_reads=True, write_methods=GATEWAY_WRITE_METHODS)


def test_missing_or_empty_tokens_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read tokens file"):
        auth_interceptor(tmp_path / "absent", require_for_reads=False, write_methods=GATEWAY_WRITE_METHODS)
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n\n   \n")
    with pytest.raises(TokenFileError, match="holds no token"):
        auth_interceptor(empty, require_for_reads=False, write_methods=GATEWAY_WRITE_METHODS)


def test_parse_tokens_and_bearer_header() -> None:
    assert parse_tokens("a\n\n # c\n  b  \r\n#x\n") == [b"a", b"b"]
    assert bearer_token((("x-other", "1"), ("authorization", "Bearer  tok "))) == b"tok"
    assert bearer_token((("Authorization", b"BEARER tok2"),)) == b"tok2"
    assert bearer_token((("authorization", "Bearer "),)) is None
    assert bearer_token((("authorization", "Basic dXNlcg=="),)) is None
    assert bearer_token(None) is None


def test_store_accepts_only_exact_tokens(tmp_path: Path) -> None:
    store = TokenStore(tokens_file(tmp_path, GOOD, OTHER_GOOD))
    assert store.accepts(GOOD.encode())
    assert store.accepts(OTHER_GOOD.encode())
    for wrong in (GOOD[:-1], GOOD + " ", GOOD.upper(), "", OTHER_GOOD + GOOD):
        assert not store.accepts(wrong.encode()), wrong
