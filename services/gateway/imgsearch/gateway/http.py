"""HTTP/JSON API and web page of the gateway, served beside gRPC in the same process and over the same code path.

Every endpoint builds the gRPC request message, calls the very GatewayServicer method the gRPC server calls
(so validation, limits, routing and error messages come from one place, the Gateway core), and returns the
SDK's domain dataclasses as JSON (`imgsearch.client.convert`), so `curl`, `imgsearch --json` and the Python SDK
see the same shapes. Errors carry the gRPC status name and the same message, `{"error": {"code", "message"}}`,
with the HTTP status mapped from the gRPC one (GRPC_TO_HTTP).

Libraries, chosen over hand-written plumbing:
- FastAPI (on Starlette): routing, multipart uploads (python-multipart), request validation and an OpenAPI 3.1
  document generated from the endpoint signatures and the SDK dataclasses, so the document cannot drift
  from the code.
- uvicorn: the ASGI server, run as a task inside the gateway's own asyncio loop (no thread, no second loop:
  the servicer's grpc.aio channels are bound to that loop). Its signal capture is switched off, so SIGTERM
  stays with the kit, which drains gRPC and then this server.
The docs page (/docs) is a small page of our own rendering /openapi.json: Swagger UI and ReDoc load from a CDN,
and nothing may be fetched at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import grpc
import uvicorn
from fastapi import Body, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsearch.api.gateway.v1 import gateway_pb2
from imgsearch.client import convert as sdk
from imgsearch.client.domain import (
    DEFAULT_K,
    HeadInfo,
    HeadSwitch,
    HeadSwitchStatus,
    ImageCount,
    ItemOutcome,
    SearchFilter,
    SearchResults,
    StoredImage,
    StoredImages,
    Tag,
    TagResults,
)
from imgsearch.kit.auth import AUTH_DENIED, BearerTokenInterceptor, bearer_token
from imgsearch.kit.convert import check_k
from imgsearch.kit.errors import ImgsearchError, InvalidArgument, NotFound
from imgsearch.kit.metrics import LATENCY_BUCKETS
from imgsearch.kit.peers import DEFAULT_PEER, peer_error
from imgsearch.kit.rpc import CLIENT_ERRORS, DEGRADED

if TYPE_CHECKING:
    from imgsearch.gateway.servicer import GatewayServicer
    from imgsearch.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("imgsearch.access")

WEB_DIR = Path(__file__).resolve().parent / "web"
_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
_UINT32_MAX = 2**32 - 1

# gRPC status -> HTTP status. RESOURCE_EXHAUSTED is 429 (a limit of the service: retry later or send less);
# a request body over HTTP_MAX_BODY_MB is 413 with the same code. FAILED_PRECONDITION is 409: the system's
# state (e.g. a head not installed here) conflicts with the request.
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
_HTTP_TO_GRPC = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 401: "UNAUTHENTICATED"}

HTTP_REQUESTS = Counter(
    "imgsearch_http_requests_total",
    "HTTP API requests handled by the gateway, by route and status.",
    ("method", "route", "code"),
)
HTTP_LATENCY = Histogram(
    "imgsearch_http_request_seconds",
    "Time from receiving an HTTP API request to sending its response.",
    ("method", "route"),
    buckets=LATENCY_BUCKETS,
)

R = TypeVar("R")


# ---- error bodies ----------------------------------------------------------------------------------------


FILTER_HELP = "metadata condition key=value; repeat a key for any of several values, different keys must all match"


class ErrorDetail(BaseModel):
    code: str = Field(description="gRPC status name, e.g. INVALID_ARGUMENT")
    message: str = Field(description="what went wrong, the same text a gRPC caller gets")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(code: str, message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class ApiError(Exception):
    """An error already mapped: gRPC status name, message and HTTP status."""

    def __init__(self, code: str, message: str, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status, self.headers = code, message, status, headers


def from_domain(exc: ImgsearchError) -> ApiError:
    return ApiError(str(exc.code.name), exc.message, GRPC_TO_HTTP.get(exc.code, 500))


# ---- request and response bodies that are not SDK dataclasses ------------------------------------------


class TextQuery(BaseModel):
    query: str = Field("", description="free text describing the images to find")
    k: int | None = Field(None, description=f"how many results (default {DEFAULT_K})")
    filter: dict[str, str | list[str]] = Field(
        default_factory=dict, description="metadata key -> value, or any of several values; all keys must match"
    )
    created_after: int | None = Field(None, description="only images added at or after (Unix ms)")
    created_before: int | None = Field(None, description="only images added before (Unix ms)")
    min_score: float | None = Field(None, description="only hits scoring at least this")
    page_token: str = Field("", description="next_page_token of the previous page")


class ExamplesQuery(BaseModel):
    positive: list[str] = Field(default_factory=list, description="ids of stored images to look like")
    negative: list[str] = Field(default_factory=list, description="ids of stored images not to look like")
    text: str = Field("", description="optional text to combine with the examples (semantic space)")
    k: int | None = Field(None, description=f"how many results (default {DEFAULT_K})")
    space: str | None = Field(None, description="visual or semantic (default: semantic with text, else visual)")
    filter: dict[str, str | list[str]] = Field(default_factory=dict, description="as in text search")
    min_score: float | None = Field(None, description="only hits scoring at least this")
    page_token: str = Field("", description="next_page_token of the previous page")


def query_filter(
    terms: Sequence[str], after: int | None, before: int | None, min_score: float | None
) -> SearchFilter | None:
    """`filter=key=value` query parameters (repeat a key for any of several values) as a SearchFilter."""
    metadata: dict[str, list[str]] = {}
    for raw in terms:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise ApiError("INVALID_ARGUMENT", f"filter {raw!r} is not key=value", 400)
        metadata.setdefault(key, []).append(value)
    if not (metadata or after or before or min_score is not None):
        return None
    return SearchFilter(metadata=metadata, created_after=after, created_before=before, min_score=min_score)


class TagList(BaseModel):
    tags: list[str] = Field(default_factory=list, description="tags, as written (case and spaces are normalised)")


class HeadChoice(BaseModel):
    head: str = Field("", description="an installed head: name or name@version")


@dataclass(frozen=True)
class AddResults:
    added: int
    failed: int
    results: list[ItemOutcome]


@dataclass(frozen=True)
class ItemResults:
    results: list[ItemOutcome]


@dataclass(frozen=True)
class DeleteResults:
    results: list[ItemOutcome]
    deleted: int
    partial: bool


@dataclass(frozen=True)
class TagPage:
    tags: list[Tag]
    next_page_token: str
    total: int


@dataclass(frozen=True)
class Heads:
    heads: list[HeadInfo]
    active: str
    status: HeadSwitchStatus


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "INVALID_ARGUMENT: the request must change"},
    401: {"model": ErrorBody, "description": "UNAUTHENTICATED: missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "NOT_FOUND"},
    409: {"model": ErrorBody, "description": "FAILED_PRECONDITION"},
    413: {"model": ErrorBody, "description": "RESOURCE_EXHAUSTED: the request body is too large"},
    429: {"model": ErrorBody, "description": "RESOURCE_EXHAUSTED: a limit was hit"},
    503: {"model": ErrorBody, "description": "UNAVAILABLE: a dependency is down or the gateway is starting"},
    504: {"model": ErrorBody, "description": "DEADLINE_EXCEEDED"},
}


# ---- the call path: auth, deadline, servicer, errors ---------------------------------------------------


class _HttpContext:
    """The part of grpc.aio's ServicerContext the servicer uses: what is left of the caller's deadline."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


def _deadline(request: Request) -> float | None:
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ApiError("INVALID_ARGUMENT", f"X-Request-Timeout must be a positive number of seconds, not {raw!r}", 400)
    return time.monotonic() + seconds


def uint32_k(k: int | None, max_k: int, what: str = "k") -> int:
    """Unset k means the default (10); values a uint32 cannot carry get the core's own message."""
    if k is None:
        return DEFAULT_K
    if not 0 <= k <= _UINT32_MAX:
        check_k(k, max_k, what)
    return k


def parse_choice(parse: Callable[[str], R], value: str) -> R:
    try:
        return parse(value)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class Api:
    """The endpoints' shared path: authenticate like the gRPC interceptor, call the servicer, map errors."""

    def __init__(self, servicer: GatewayServicer, auth: BearerTokenInterceptor | None) -> None:
        self.servicer = servicer
        self.auth = auth

    @property
    def settings(self) -> GatewaySettings:
        return self.servicer.gw.settings

    def authenticate(self, request: Request, method: str) -> None:
        """The gRPC method's token policy (writes always, reads when AUTH_READS), with the HTTP header."""
        full = f"/{_SERVICE}/{method}"
        if self.auth is None or not self.auth.needs_token(full):
            return
        header = request.headers.get("authorization")
        token = bearer_token([("authorization", header)] if header is not None else [])
        what = f"{request.method} {request.url.path}"
        if token is None:
            reason, message = (
                "missing",
                f"{what} requires a bearer token: send the header 'Authorization: Bearer <token>'",
            )
        elif not self.auth.store.accepts(token):
            reason, message = "invalid", f"{what}: the bearer token is not valid"
        else:
            return
        AUTH_DENIED.labels(full, reason).inc()
        raise ApiError("UNAUTHENTICATED", message, 401, {"WWW-Authenticate": 'Bearer realm="imgsearch"'})

    def guard(self, method: str) -> Any:
        """A route dependency: the token check runs before the endpoint's own parameters are validated."""

        async def check(request: Request) -> None:
            request.state.grpc_method = method
            self.authenticate(request, method)

        return Depends(check)

    async def call(self, request: Request, method: str, run: Callable[[Any], Awaitable[R]]) -> R:
        """Run one servicer call for an HTTP request, as the gRPC server would run it (after `guard`)."""
        context = _HttpContext(_deadline(request))
        request.state.grpc_method = method
        remaining = context.time_remaining()
        try:
            async with asyncio.timeout(remaining):
                return await run(context)
        except ImgsearchError as exc:
            raise from_domain(exc) from exc
        except TimeoutError:
            raise ApiError("DEADLINE_EXCEEDED", f"{method}: the deadline (X-Request-Timeout) passed", 504) from None
        except grpc.RpcError as exc:
            raise from_domain(peer_error(exc, DEFAULT_PEER)) from exc


async def _images(files: Sequence[UploadFile], ids: Sequence[str], meta: dict[str, str]) -> AsyncIterator[Any]:
    """The uploaded files as an AddImages request stream: read one at a time from the spooled upload."""
    for i, f in enumerate(files):
        data = await f.read()
        yield gateway_pb2.AddImagesRequest(
            id=ids[i] if i < len(ids) else "", image=data, metadata=meta, source_name=f.filename or ""
        )
        await f.close()


def parse_meta(pairs: Sequence[str]) -> dict[str, str]:
    """`key=value` form fields (like the CLI's --meta) into one metadata map."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidArgument(f"meta {pair!r} must look like key=value")
        out[key.strip()] = value
    return out


async def _read(upload: UploadFile | None) -> bytes:
    if upload is None:
        return b""
    try:
        return await upload.read()
    finally:
        await upload.close()


# ---- the application -----------------------------------------------------------------------------------


def create_app(servicer: GatewayServicer, auth: BearerTokenInterceptor | None = None) -> FastAPI:
    """The HTTP/JSON API, the web page (/), its static files, /openapi.json and /docs."""
    api = Api(servicer, auth)
    s = servicer.gw.settings
    app = FastAPI(
        title="imgsearch",
        version="0.1.0",
        summary="Semantic image search and zero-shot tagging over HTTP/JSON; the same API as gRPC.",
        description=(
            "Every endpoint calls the gateway's gRPC method named in its description, with the same validation, "
            'limits and messages. Errors are `{"error": {"code": "<gRPC status>", "message": "..."}}`. '
            "With authentication on, writes (and reads when AUTH_READS) need `Authorization: Bearer <token>`. "
            "`X-Request-Timeout: <seconds>` sets a deadline."
        ),
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        responses=ERRORS,
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        request.state.error = exc
        return error_response(exc.code, exc.message, exc.status, exc.headers)

    @app.exception_handler(ImgsearchError)
    async def _domain_error(request: Request, exc: ImgsearchError) -> JSONResponse:
        err = from_domain(exc)
        request.state.error = err
        return error_response(err.code, err.message, err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form", "header"))
            parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
        err = ApiError("INVALID_ARGUMENT", "; ".join(parts) or "invalid request", 400)
        request.state.error = err
        return error_response(err.code, err.message, err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_TO_GRPC.get(exc.status_code, "INVALID_ARGUMENT" if exc.status_code < 500 else "INTERNAL")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path} (see /docs)"
        err = ApiError(code, message, exc.status_code)
        request.state.error = err
        return error_response(code, message, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception) -> JSONResponse:
        method = getattr(request.state, "grpc_method", f"{request.method} {request.url.path}")
        err = ApiError("INTERNAL", f"internal error in {method}; see server logs", 500)
        request.state.fault = exc
        request.state.error = err
        return error_response(err.code, err.message, err.status)

    # ---- search ----

    @app.get(
        "/v1/search/text",
        response_model=SearchResults,
        tags=["search"],
        summary="Search by text",
        dependencies=[api.guard("SearchByText")],
    )
    async def search_text(
        request: Request,
        q: Annotated[str, Query(description="free text describing the images to find")] = "",
        k: Annotated[int | None, Query(description=f"how many results (default {DEFAULT_K})")] = None,
        filter: Annotated[list[str] | None, Query(description=FILTER_HELP)] = None,
        created_after: Annotated[int | None, Query(description="only images added at or after (Unix ms)")] = None,
        created_before: Annotated[int | None, Query(description="only images added before (Unix ms)")] = None,
        min_score: Annotated[float | None, Query(description="only hits scoring at least this")] = None,
        page_token: Annotated[str, Query(description="next_page_token of the previous page")] = "",
    ) -> SearchResults:
        """Images matching a free-text query (gRPC SearchByText)."""
        f = query_filter(filter or [], created_after, created_before, min_score)
        req = sdk.search_text_request(q, None, f, page_token)
        req.k = uint32_k(k, s.max_k)
        r = await api.call(request, "SearchByText", lambda ctx: servicer.SearchByText(req, ctx))
        return sdk.search_results(r.hits, r.meta, r.next_page_token)

    @app.post(
        "/v1/search/text",
        response_model=SearchResults,
        tags=["search"],
        summary="Search by text (JSON)",
        dependencies=[api.guard("SearchByText")],
    )
    async def search_text_post(request: Request, body: TextQuery) -> SearchResults:
        """Images matching a free-text query given as JSON `{"query": ..., "k": ...}` (gRPC SearchByText)."""
        f = SearchFilter(
            metadata=body.filter,
            created_after=body.created_after,
            created_before=body.created_before,
            min_score=body.min_score,
        )
        req = sdk.search_text_request(body.query, None, f, body.page_token)
        req.k = uint32_k(body.k, s.max_k)
        r = await api.call(request, "SearchByText", lambda ctx: servicer.SearchByText(req, ctx))
        return sdk.search_results(r.hits, r.meta, r.next_page_token)

    @app.post(
        "/v1/search/examples",
        response_model=SearchResults,
        tags=["search"],
        summary="Relevance feedback",
        dependencies=[api.guard("SearchByExamples")],
    )
    async def search_examples(request: Request, body: ExamplesQuery) -> SearchResults:
        """Images like the positive ids and unlike the negative ones, optionally with text (gRPC SearchByExamples)."""
        f = SearchFilter(metadata=body.filter, min_score=body.min_score)
        req = sdk.examples_request(body.positive, body.negative, body.text, None, None, f, body.page_token)
        req.k = uint32_k(body.k, s.max_k)
        if body.space:
            req.space = parse_choice(sdk.space, body.space)
        r = await api.call(request, "SearchByExamples", lambda ctx: servicer.SearchByExamples(req, ctx))
        return sdk.search_results(r.hits, r.meta, r.next_page_token)

    @app.post(
        "/v1/search/image",
        response_model=SearchResults,
        tags=["search"],
        summary="Search by image",
        dependencies=[api.guard("SearchByImage")],
    )
    async def search_image(
        request: Request,
        image: Annotated[UploadFile | None, File(description="the query image (JPEG, PNG, ...)")] = None,
        k: Annotated[int | None, Form(description=f"how many results (default {DEFAULT_K})")] = None,
        space: Annotated[str, Form(description="visual (looks alike) or semantic (means alike)")] = "visual",
    ) -> SearchResults:
        """Images similar to an uploaded one, multipart field `image` (gRPC SearchByImage)."""
        data = await _read(image)
        req = gateway_pb2.SearchByImageRequest(image=data, k=uint32_k(k, s.max_k), space=parse_choice(sdk.space, space))
        r = await api.call(request, "SearchByImage", lambda ctx: servicer.SearchByImage(req, ctx))
        return sdk.search_results(r.hits, r.meta, r.next_page_token)

    @app.get(
        "/v1/search/similar",
        response_model=SearchResults,
        tags=["search"],
        summary="Search by stored id",
        dependencies=[api.guard("SearchById")],
    )
    async def search_similar(
        request: Request,
        id: Annotated[str, Query(description="a stored image's id")] = "",
        k: Annotated[int | None, Query(description=f"how many results (default {DEFAULT_K})")] = None,
        space: Annotated[str, Query(description="visual or semantic")] = "visual",
        include_self: Annotated[bool, Query(description="return the image itself too")] = False,
        filter: Annotated[list[str] | None, Query(description=FILTER_HELP)] = None,
        min_score: Annotated[float | None, Query(description="only hits scoring at least this")] = None,
        page_token: Annotated[str, Query(description="next_page_token of the previous page")] = "",
    ) -> SearchResults:
        """Images similar to a stored image (gRPC SearchById); the image itself is left out unless asked for."""
        f = query_filter(filter or [], None, None, min_score)
        req = sdk.similar_request(id, None, space if space in sdk.SPACES else "visual", include_self, f, page_token)
        req.k = uint32_k(k, s.max_k)
        req.space = parse_choice(sdk.space, space)
        r = await api.call(request, "SearchById", lambda ctx: servicer.SearchById(req, ctx))
        return sdk.search_results(r.hits, r.meta, r.next_page_token)

    # ---- tagging and the vocabulary ----

    @app.post(
        "/v1/tag",
        response_model=TagResults,
        tags=["tags"],
        summary="Tag an image",
        dependencies=[api.guard("TagImage")],
    )
    async def tag_image(
        request: Request,
        image: Annotated[UploadFile | None, File(description="the image to tag")] = None,
        k: Annotated[int | None, Form(description=f"how many tags (default {DEFAULT_K})")] = None,
        filter: Annotated[str, Form(description="all, seen or unseen tags")] = "all",
    ) -> TagResults:
        """Rank the live vocabulary against an uploaded image (gRPC TagImage); `seen` false marks unseen tags."""
        data = await _read(image)
        req = gateway_pb2.TagImageRequest(
            image=data, k=uint32_k(k, s.max_tag_k), filter=parse_choice(sdk.tag_filter, filter)
        )
        r = await api.call(request, "TagImage", lambda ctx: servicer.TagImage(req, ctx))
        return sdk.tag_results(r)

    @app.get(
        "/v1/tags",
        response_model=TagPage,
        tags=["tags"],
        summary="List the vocabulary",
        dependencies=[api.guard("ListTags")],
    )
    async def list_tags(
        request: Request,
        filter: Annotated[str, Query(description="all, seen or unseen")] = "all",
        page_size: Annotated[int, Query(ge=0, le=_UINT32_MAX, description="0: the server's default")] = 0,
        page_token: Annotated[str, Query(description="next_page_token of the previous page")] = "",
    ) -> TagPage:
        """One page of the live vocabulary (gRPC ListTags); `total` is the vocabulary's size under the filter."""
        req = gateway_pb2.ListTagsRequest(
            filter=parse_choice(sdk.tag_filter, filter), page_size=page_size, page_token=page_token
        )
        r = await api.call(request, "ListTags", lambda ctx: servicer.ListTags(req, ctx))
        return TagPage(sdk.tags(r), r.next_page_token, r.total)

    @app.post(
        "/v1/tags", response_model=ItemResults, tags=["tags"], summary="Add tags", dependencies=[api.guard("AddTags")]
    )
    async def add_tags(request: Request, body: TagList) -> ItemResults:
        """Add tags to the live vocabulary, ranked from the next call on (gRPC AddTags); each succeeds alone."""
        req = gateway_pb2.AddTagsRequest(tags=body.tags)
        r = await api.call(request, "AddTags", lambda ctx: servicer.AddTags(req, ctx))
        return ItemResults(sdk.tag_outcomes(r.results))

    @app.delete(
        "/v1/tags",
        response_model=ItemResults,
        tags=["tags"],
        summary="Remove tags",
        dependencies=[api.guard("RemoveTags")],
    )
    async def remove_tags(request: Request, body: Annotated[TagList, Body()]) -> ItemResults:
        """Remove tags from the live vocabulary (gRPC RemoveTags); each succeeds or fails alone."""
        req = gateway_pb2.RemoveTagsRequest(tags=body.tags)
        r = await api.call(request, "RemoveTags", lambda ctx: servicer.RemoveTags(req, ctx))
        return ItemResults(sdk.tag_outcomes(r.results))

    @app.delete(
        "/v1/tags/{tag}",
        response_model=ItemOutcome,
        tags=["tags"],
        summary="Remove one tag",
        dependencies=[api.guard("RemoveTags")],
    )
    async def remove_tag(request: Request, tag: str) -> ItemOutcome:
        """Remove one tag (gRPC RemoveTags); its error, if any, is the response's status."""
        req = gateway_pb2.RemoveTagsRequest(tags=[tag])
        r = await api.call(request, "RemoveTags", lambda ctx: servicer.RemoveTags(req, ctx))
        return _single(sdk.tag_outcomes(r.results))

    # ---- images ----

    @app.post(
        "/v1/images",
        response_model=AddResults,
        tags=["images"],
        summary="Add images",
        dependencies=[api.guard("AddImages")],
    )
    async def add_images(
        request: Request,
        image: Annotated[list[UploadFile], File(description="one or more image files")],
        id: Annotated[
            list[str] | None, Form(description="ids by position (default: the SHA-256 of the image, 16 hex digits)")
        ] = None,
        meta: Annotated[list[str] | None, Form(description="key=value metadata, given to every image")] = None,
    ) -> AddResults:
        """Store uploaded images (gRPC AddImages, streamed one file at a time); each succeeds or fails alone."""
        ids = id or []
        if len(ids) > len(image):
            raise ApiError("INVALID_ARGUMENT", f"{len(ids)} ids given for {len(image)} images", 400)
        metadata = parse_meta(meta or [])
        r = await api.call(request, "AddImages", lambda ctx: servicer.AddImages(_images(image, ids, metadata), ctx))
        return AddResults(r.added, r.failed, sdk.add_outcomes(r))

    @app.get(
        "/v1/images",
        response_model=StoredImages,
        tags=["images"],
        summary="Get stored images",
        dependencies=[api.guard("GetImages")],
    )
    async def get_images(
        request: Request, id: Annotated[list[str] | None, Query(description="ids to look up (repeat)")] = None
    ) -> StoredImages:
        """Stored records by id (gRPC GetImages); ids not stored are listed in `missing_ids`."""
        req = gateway_pb2.GetImagesRequest(ids=id or [])
        r = await api.call(request, "GetImages", lambda ctx: servicer.GetImages(req, ctx))
        return sdk.stored_images(r)

    @app.delete(
        "/v1/images",
        response_model=DeleteResults,
        tags=["images"],
        summary="Delete stored images",
        dependencies=[api.guard("DeleteImages")],
    )
    async def delete_images(
        request: Request, id: Annotated[list[str] | None, Query(description="ids to delete (repeat)")] = None
    ) -> DeleteResults:
        """Delete stored images (gRPC DeleteImages); each id succeeds or fails alone (NOT_FOUND if not stored)."""
        req = gateway_pb2.DeleteImagesRequest(ids=id or [])
        r = await api.call(request, "DeleteImages", lambda ctx: servicer.DeleteImages(req, ctx))
        return DeleteResults(sdk.delete_results(r).results, r.deleted, r.partial)

    @app.get(
        "/v1/count",
        response_model=ImageCount,
        tags=["images"],
        summary="Count stored images",
        dependencies=[api.guard("CountImages")],
    )
    async def count_images(request: Request) -> ImageCount:
        """Images stored, in all and per shard (gRPC CountImages); partial when a shard did not answer."""
        r = await api.call(
            request, "CountImages", lambda ctx: servicer.CountImages(gateway_pb2.CountImagesRequest(), ctx)
        )
        return sdk.image_count(r)

    @app.get(
        "/v1/thumbnails/{image_id:path}",
        response_class=Response,
        tags=["images"],
        summary="A stored image's thumbnail",
        dependencies=[api.guard("GetImages")],
        responses={200: {"content": {"image/jpeg": {}}, "description": "a small JPEG"}},
    )
    async def get_thumbnail(request: Request, image_id: str) -> Response:
        """The small JPEG kept with a stored image (gRPC GetImages with include_thumbnails); 404 when none."""
        req = gateway_pb2.GetImagesRequest(ids=[image_id], include_thumbnails=True)
        r = await api.call(request, "GetImages", lambda ctx: servicer.GetImages(req, ctx))
        if not r.images:
            if r.partial:
                raise ApiError("UNAVAILABLE", f"image {image_id!r} lives on a shard that did not answer", 503)
            raise from_domain(NotFound(f"image {image_id!r} is not stored"))
        if not r.images[0].thumbnail:
            raise from_domain(NotFound(f"image {image_id!r} has no thumbnail (thumbnails were off when it was added)"))
        # Thumbnails change only when the image is replaced under the same id: short caching is safe.
        return Response(r.images[0].thumbnail, media_type="image/jpeg", headers={"Cache-Control": "max-age=60"})

    @app.get(
        "/v1/images/{image_id:path}",
        response_model=StoredImage,
        tags=["images"],
        summary="Get one image",
        dependencies=[api.guard("GetImages")],
    )
    async def get_image(request: Request, image_id: str) -> StoredImage:
        """One stored record (gRPC GetImages); 404 when the id is not stored."""
        req = gateway_pb2.GetImagesRequest(ids=[image_id])
        r = await api.call(request, "GetImages", lambda ctx: servicer.GetImages(req, ctx))
        found = sdk.stored_images(r)
        if not found.images:
            if found.partial:
                raise ApiError("UNAVAILABLE", f"image {image_id!r} lives on a shard that did not answer", 503)
            raise from_domain(NotFound(f"image {image_id!r} is not stored"))
        return found.images[0]

    @app.delete(
        "/v1/images/{image_id:path}",
        response_model=ItemOutcome,
        tags=["images"],
        summary="Delete one",
        dependencies=[api.guard("DeleteImages")],
    )
    async def delete_image(request: Request, image_id: str) -> ItemOutcome:
        """Delete one stored image (gRPC DeleteImages); 404 when it is not stored."""
        req = gateway_pb2.DeleteImagesRequest(ids=[image_id])
        r = await api.call(request, "DeleteImages", lambda ctx: servicer.DeleteImages(req, ctx))
        return _single(sdk.delete_results(r).results)

    # ---- heads ----

    @app.get(
        "/v1/heads",
        response_model=Heads,
        tags=["heads"],
        summary="List projection heads",
        dependencies=[api.guard("ListHeads")],
    )
    async def list_heads(request: Request) -> Heads:
        """Installed heads, the active one, and a switch's progress per shard (gRPC ListHeads)."""
        r = await api.call(request, "ListHeads", lambda ctx: servicer.ListHeads(gateway_pb2.ListHeadsRequest(), ctx))
        return Heads([sdk.head(h) for h in r.heads], r.active, sdk.head_status(r.status))

    @app.post(
        "/v1/heads/activate",
        response_model=HeadSwitch,
        tags=["heads"],
        summary="Activate a head",
        dependencies=[api.guard("ActivateHead")],
    )
    async def activate_head(request: Request, body: HeadChoice) -> HeadSwitch:
        """Start a build-then-flip switch to an installed head (gRPC ActivateHead); returns at once."""
        req = gateway_pb2.ActivateHeadRequest(head=body.head)
        r = await api.call(request, "ActivateHead", lambda ctx: servicer.ActivateHead(req, ctx))
        return sdk.head_switch(r)

    # ---- the page, its files, the docs ----

    @app.get("/healthz", tags=["service"], summary="Readiness")
    async def healthz() -> dict[str, str]:
        """200 once the gateway has loaded its heads and knows the head configuration, else 503."""
        servicer.gw.heads.current()
        return {"status": "SERVING"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(WEB_DIR / "docs.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def asgi_app(servicer: GatewayServicer, auth: BearerTokenInterceptor | None = None) -> ASGIApp:
    """create_app behind the edge middleware (body limit, access log, HTTP metrics): what the server runs."""
    return _Edge(create_app(servicer, auth), servicer.gw.settings.http_max_body_mb * 1024 * 1024)


def _single(outcomes: list[ItemOutcome]) -> ItemOutcome:
    """A one-item batch as a REST resource call: its own error becomes the response's status."""
    (one,) = outcomes
    if not one.ok:
        code = one.code or "UNKNOWN"
        raise ApiError(code, one.error or "", http_status(code))
    return one


def http_status(code: str) -> int:
    """The HTTP status for a gRPC status name."""
    status = grpc.StatusCode.__members__.get(code)
    return 500 if status is None else GRPC_TO_HTTP.get(status, 500)


# ---- the edge: body limit, access log, metrics ---------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class _Edge:
    """Pure ASGI middleware: refuses bodies over the limit (413), counts, times and logs every request once."""

    def __init__(self, app: FastAPI, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._too_large(scope, send, start)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _BodyTooLarge:
            await self._too_large(scope, send, start)
            return
        self._done(scope, status, start)

    async def _too_large(self, scope: Scope, send: Send, start: float) -> None:
        message = f"request body is larger than {self.max_body // (1024 * 1024)} MiB (HTTP_MAX_BODY_MB)"
        response = error_response("RESOURCE_EXHAUSTED", message, 413)
        await response(scope, _no_receive, send)
        self._done(scope, 413, start, message)

    def _done(self, scope: Scope, status: int, start: float, message: str = "") -> None:
        elapsed = time.perf_counter() - start
        route_obj = scope.get("route")
        route = str(getattr(route_obj, "path", "")) or "unmatched"
        method = str(scope.get("method", ""))
        HTTP_REQUESTS.labels(method, route, str(status)).inc()
        HTTP_LATENCY.labels(method, route).observe(elapsed)
        state = scope.get("state") or {}
        err: ApiError | None = state.get("error")
        fault: BaseException | None = state.get("fault")
        code = err.code if err is not None else ("OK" if status < 400 else "RESOURCE_EXHAUSTED")
        if code == "OK" or code in CLIENT_ERRORS:
            level = logging.INFO
        elif code in DEGRADED:
            level = logging.WARNING
        else:
            level = logging.ERROR
        if not access_log.isEnabledFor(level):
            return
        extra: dict[str, Any] = {
            "http_method": method,
            "http_path": scope.get("path", ""),
            "http_status": status,
            "grpc_method": state.get("grpc_method", ""),
            "grpc_code": code,
            "duration_ms": round(elapsed * 1000, 3),
            "caller": "{}:{}".format(*scope["client"]) if scope.get("client") else "",
        }
        if err is not None or message:
            extra["error"] = err.message if err is not None else message
        access_log.log(level, "%s %s %s", method, route, status, extra=extra, exc_info=fault)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


# ---- the server inside the gateway's loop --------------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the kit owns SIGTERM/SIGINT and stops this server itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """The HTTP/JSON API and web page on HTTP_HOST:HTTP_PORT, run as a task in the gateway's loop."""

    def __init__(self, servicer: GatewayServicer, auth: BearerTokenInterceptor | None) -> None:
        self.settings = servicer.gw.settings
        self.app = asgi_app(servicer, auth)
        self.port = 0
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and serve; raises SystemExit with the address when the port cannot be bound."""
        s = self.settings
        config = uvicorn.Config(
            self.app,
            host=s.http_host,
            port=s.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=max(1, int(s.grace_seconds)),
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(), name="http-server")
        while not server.started:
            if self._task.done():
                exc = self._task.exception()
                raise SystemExit(f"imgsearch-gateway: cannot serve HTTP on {s.http_host}:{s.http_port}: {exc}")
            await asyncio.sleep(0.02)
        sockets = [sock for srv in server.servers for sock in (srv.sockets or ())]
        self.port = int(sockets[0].getsockname()[1]) if sockets else s.http_port
        log.info(
            "http listening",
            extra={"address": f"{s.http_host}:{self.port}", "page": f"http://{s.http_host}:{self.port}/"},
        )

    async def stop(self) -> None:
        """Stop taking connections, let requests in flight finish (GRACE_SECONDS), then return."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await self._task
        log.info("http stopped")
