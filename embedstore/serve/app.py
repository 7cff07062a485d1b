"""The playground's HTTP API (FastAPI) and its static page.

Every endpoint is a thin call into :class:`~embedstore.serve.playground.Playground`. Request
bodies are validated by pydantic models (unknown fields refused, numbers finite, lengths
bounded); every failure is a JSON ``{"error": "..."}`` with a 4xx status (5xx only for a bug),
never a traceback page. ``token``: when set, every request must carry it (``?token=`` once, then
a cookie), as Jupyter does for servers reachable from other machines. ``allowed_hosts``: the
``Host`` headers accepted (DNS-rebinding guard for a server bound to 127.0.0.1).

Endpoints (JSON unless said):

=========================  =========================================================================
``GET  /``                 the page (``static/index.html``); ``/static/*`` its script and style
``GET  /api/experiment``   the experiment, its members and the variant it describes
``POST /api/run``          score a variant -> metrics, per-class figures, confusion matrix, result id
``GET  /api/activity``     what the server is doing (prompt encoding) while a request waits
``POST /api/cell``         images of a confusion cell with their top-3 classes
``POST /api/neighbours``   an image's nearest images and nearest classes
``POST /api/search``       nearest images to a text
``POST /api/search-image`` nearest images to an uploaded image (raw body, ``?k=``)
``GET  /api/thumb``        ``?key=&size=``: a JPEG thumbnail of a stored image
``POST /api/prompt-table`` start the per-template table (a job); ``GET /api/jobs/{id}`` polls it
``GET|POST /api/variants`` the variants kept in this session / keep one
``POST /api/save``         write the variant as an experiment TOML, run it, log it
=========================  =========================================================================
"""
from __future__ import annotations

import logging
import secrets
from importlib import resources
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from embedstore.errors import EmbedstoreError, StoreNotFoundError
from embedstore.serve.playground import Playground
from embedstore.serve.variant import PromptItem, Variant

log = logging.getLogger(__name__)

MAX_PROMPTS = 20_000
MAX_TEXT = 1_000
MAX_UPLOAD = 20 << 20
TOKEN_COOKIE = "embedstore_token"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class PromptIn(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    cls: Optional[str] = Field(None, alias="class", max_length=MAX_TEXT)
    on: bool = True


class VariantIn(_Strict):
    aggregate: Literal["prob-mean", "embed-mean", "logit-mean"]
    scale: Union[float, Literal["model"]]
    drop_below: Optional[float] = None
    ensemble: Literal["weighted", "soft-vote"] = "weighted"
    weights: list[float] = Field(min_length=1, max_length=64)
    prompts: list[PromptIn] = Field(min_length=1, max_length=MAX_PROMPTS)

    def to_variant(self) -> Variant:
        return Variant(self.aggregate, self.scale, self.drop_below, self.ensemble, tuple(self.weights),
                       tuple(PromptItem(p.text, p.cls, p.on) for p in self.prompts))


class CellIn(_Strict):
    result: str = Field(min_length=1, max_length=64)
    true: int = Field(ge=0)
    predicted: int = Field(ge=0)
    offset: int = Field(0, ge=0)
    limit: int = Field(60, ge=1, le=200)


class NeighboursIn(_Strict):
    key: str = Field(min_length=1, max_length=4096)
    k: int = Field(12, ge=1, le=100)
    result: Optional[str] = Field(None, max_length=64)
    variant: Optional[VariantIn] = None


class SearchIn(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    k: int = Field(24, ge=1, le=100)


class KeepIn(_Strict):
    result: str = Field(min_length=1, max_length=64)
    name: str = Field("", max_length=80)


class SaveIn(_Strict):
    variant: VariantIn
    name: str = Field(min_length=1, max_length=85)
    overwrite: bool = False


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(playground: Playground, token: Optional[str] = None,
               allowed_hosts: Optional[list[str]] = None) -> FastAPI:
    """The FastAPI application over ``playground`` (see the module docstring)."""
    app = FastAPI(title="embedstore playground", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("embedstore.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.exception_handler(EmbedstoreError)
    async def embedstore_error(request: Request, exc: EmbedstoreError) -> JSONResponse:
        return _error(404 if isinstance(exc, StoreNotFoundError) else 400, str(exc))

    @app.exception_handler(FileExistsError)
    async def exists_error(request: Request, exc: FileExistsError) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return _error(500, f"unexpected {type(exc).__name__}; this is a bug in embedstore (the server log has "
                           "the traceback)")

    if token is not None:
        @app.middleware("http")
        async def require_token(request: Request, call_next: Any) -> Response:
            given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
            if not secrets.compare_digest(given.encode(), token.encode()):
                return _error(403, "missing or wrong access token: open the URL with ?token= that "
                                   "`embedstore serve` printed")
            response = await call_next(request)
            if request.query_params.get("token"):
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response

    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), headers={"Cache-Control": "no-store"})

    @app.get("/api/experiment")
    def experiment() -> dict[str, Any]:
        return playground.describe()

    @app.post("/api/run")
    def run(body: VariantIn) -> dict[str, Any]:
        return playground.run(body.to_variant()).summary

    @app.get("/api/activity")
    def activity() -> dict[str, Any]:
        return playground.activity.snapshot()

    @app.post("/api/cell")
    def cell(body: CellIn) -> dict[str, Any]:
        return playground.cell(body.result, body.true, body.predicted, body.offset, body.limit)

    @app.post("/api/neighbours")
    def neighbours(body: NeighboursIn) -> dict[str, Any]:
        variant = body.variant.to_variant() if body.variant is not None else None
        return playground.neighbours(body.key, body.k, body.result, variant)

    @app.post("/api/search")
    def search(body: SearchIn) -> dict[str, Any]:
        return playground.search_text(body.text, body.k)

    @app.post("/api/search-image")
    async def search_image(request: Request, k: int = Query(24, ge=1, le=100)) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD:
            return _error(413, f"image: larger than {MAX_UPLOAD >> 20} MiB")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_UPLOAD:
                return _error(413, f"image: larger than {MAX_UPLOAD >> 20} MiB")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(playground.search_image, bytes(data), k)

    @app.get("/api/thumb")
    def thumb(key: str = Query(min_length=1, max_length=4096), size: int = Query(160, ge=16, le=512)) -> Response:
        data = playground.thumbnail_of(key, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/prompt-table")
    def prompt_table(body: VariantIn) -> dict[str, Any]:
        return playground.start_prompt_table(body.to_variant()).to_dict()

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        return playground.job(job_id).to_dict()

    @app.get("/api/variants")
    def variants() -> list[dict[str, Any]]:
        return list(playground.variants)

    @app.post("/api/variants")
    def keep(body: KeepIn) -> dict[str, Any]:
        return playground.keep(body.result, body.name)

    @app.post("/api/save")
    def save(body: SaveIn) -> dict[str, Any]:
        return playground.save(body.variant.to_variant(), body.name, body.overwrite)

    app.state.playground = playground
    return app
