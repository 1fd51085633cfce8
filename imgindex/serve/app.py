"""The service's routes: `create_app(index_dir)` loads the index (memory-mapped), its ids and the recorded model once and
returns an ASGI app (FastAPI), which can be served by uvicorn or mounted in another app.
Queries that arrive together are answered together: the images among them go through one
forward pass and every query through one faiss search (QueryBatcher). Nothing a client sends
names a file: thumbnails are read only for (shard, key) pairs the index holds, from the sources
the embeddings recorded. Every answer is JSON text (`{"error": ...}` when refused), every request
body is refused as soon as it passes its limit, and one query's failure is never another's.
"""

import asyncio
import functools
import hmac
import logging
from collections.abc import AsyncIterator
from html import escape
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import numpy as np

from imgindex.errors import ConfigError, NotFound, SampleError, install_hint
from imgindex.indexes.query import Hit
from imgindex.open_index import open_searcher
from imgindex.formats.names import printable
from imgindex.serve.batcher import Query, QueryBatcher

log = logging.getLogger(__name__)

MAX_HITS = 1000  # hits one HTTP answer carries: a service bound on answer size (the command line allows 100,000)
FORM_OVERHEAD = 64 * 2**10  # a multipart form's boundaries, part headers and small fields around the image
VECTOR_NUMBER_BYTES = 48  # room for one number of a vector in JSON: "-1.2345678901234567e-300, " and indentation


def _json_values(row: dict) -> dict:
    return {name: printable(value) if isinstance(value, str) else value for name, value in row.items()}


def create_app(index_dir: str | Path, token: str | None = None, max_upload: int = 20 * 2**20,
               device: str | None = None):
    """The service for one index: JSON API under /api, the page at /, the API reference at /docs
    (OpenAPI at /openapi.json). An unusable `device` is a ConfigError here, not on every query."""
    try:
        from fastapi import FastAPI, HTTPException, Query as Param, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response
        from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
        from starlette.exceptions import HTTPException as StarletteHTTPException
        from starlette.formparsers import MultiPartException, MultiPartParser
    except ImportError:
        raise ConfigError(f"imgindex serve needs its extra: {install_hint('serve')}") from None

    _check_device(device)
    searcher = open_searcher(index_dir, device)
    try:
        searcher.embedder()  # the recorded model, loaded once, before the first query
        no_model = None
    except ConfigError as exc:  # e.g. synthetic vectors: key and vector queries still work
        no_model = str(exc)
        log.warning("image queries are off (key and vector queries work): %s", no_model)
    batcher = QueryBatcher(searcher)
    manifest = searcher.manifest
    dim = int(searcher.index.d)
    vector_limit = FORM_OVERHEAD + VECTOR_NUMBER_BYTES * dim
    app = FastAPI(title="imgindex", description=printable(f"Search the index at {index_dir}"), version="1",
                  docs_url=None, redoc_url=None)
    app.state.searcher, app.state.batcher = searcher, batcher

    class Hits(BaseModel):
        hits: list[Hit]  # the Searcher's own dataclass: one definition of a hit

    class Error(BaseModel):
        error: str

    class Health(BaseModel):
        status: str
        count: int

    class Info(BaseModel):
        model: str
        weights: dict[str, str | None]
        count: int
        dim: int
        factory: str
        recall_at_10: float | None
        search_params: dict[str, Any] | None
        shards: int

    VectorQuery = create_model(
        "VectorQuery", __config__=ConfigDict(strict=True),
        vector=(Annotated[list[float], Field(min_length=dim, max_length=dim)], ...),
        k=(int, Field(10, ge=1, le=MAX_HITS)), shard=(str | None, None))

    refusals = {400: "the index records no model: query by key or vector", 404: "no such key, shard or sample",
                413: "the request body or the image is over its limit", 422: "a malformed request or image"}
    if token:
        refusals[401] = "a bearer token is required"

    def answers(*codes: int) -> dict:
        """The refusals a route documents, each `{"error": ...}`."""
        return {code: {"model": Error, "description": refusals[code]}
                for code in sorted({*codes, *([401] if token else [])})}

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": printable(message)}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail
        if exc.status_code == 404 and "endpoint" not in request.scope:  # no route matched
            message = f"no such route: {request.url.path} (the API is described at /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: use {(exc.headers or {}).get('Allow')}"
        return error(exc.status_code, str(message), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, _validation_message(exc.errors()))

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token:
            scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() == "bearer":  # RFC 7235: the scheme is case-insensitive
                given = credentials.strip()
            else:
                given = request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return error(401, "a bearer token is required (Authorization: Bearer TOKEN, or ?token=TOKEN)",
                             {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    def check_shard(shard: str | None) -> str | None:
        if shard is not None:
            try:
                searcher.shard_rows(shard)
            except NotFound as exc:
                raise HTTPException(404, str(exc)) from None
        return shard

    async def answer(query: Query) -> dict:
        try:
            hits = await batcher.ask(query)
        except SampleError as exc:
            raise HTTPException(413 if exc.kind == "too_large" else 422, f"{exc.kind}: {exc}") from None
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except ConfigError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"hits": [_json_values(hit) for hit in hits]}

    async def body(request: Request, limit: int, refusal: str) -> bytes:
        return b"".join([chunk async for chunk in _limited(request, limit, refusal)])

    async def upload(request: Request) -> bytes:
        """The image bytes of a request: the raw body, or the `file` field of a multipart form;
        reading stops as soon as the body passes --max-upload (and the form's overhead)."""
        over = f"the upload is over the limit of {max_upload} bytes (--max-upload)"
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            stream = _limited(request, max_upload + FORM_OVERHEAD, over)
            try:
                form = await MultiPartParser(request.headers, stream, max_files=1, max_fields=16,
                                             max_part_size=FORM_OVERHEAD).parse()
            except MultiPartException as exc:
                raise HTTPException(422, f"a malformed form: {exc.message}") from None
            try:
                sent = form.get("file")
                if sent is None or isinstance(sent, str):
                    raise HTTPException(422, "send the image as the `file` field of the form, or as the raw body")
                data = await sent.read(max_upload + 1)
            finally:
                await form.close()
        else:
            data = await body(request, max_upload, over)
        if len(data) > max_upload:
            raise HTTPException(413, over)
        if not data:
            raise HTTPException(422, "empty upload: send an image")
        return data

    k_param = Param(ge=1, le=MAX_HITS, description="hits to return")

    @app.get("/api/health", response_model=Health, responses=answers())
    async def health() -> dict:
        return {"status": "ok", "count": int(searcher.index.ntotal)}

    @app.get("/api/info", response_model=Info, responses=answers())
    async def info() -> dict:
        emb = manifest.embeddings
        return {"model": emb.model.name, "weights": {"source": emb.weights_source, "sha256": emb.weights_sha256},
                "count": manifest.count, "dim": manifest.dim, "factory": manifest.factory,
                "recall_at_10": manifest.recall_at_10, "search_params": manifest.search_params,
                "shards": len(manifest.parts)}

    image_body = {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}}}}

    @app.post("/api/search/image", response_model=Hits, responses=answers(400, 404, 413, 422),
              openapi_extra={"requestBody": image_body})
    async def search_image(request: Request, k: Annotated[int, k_param] = 10, shard: str | None = None) -> dict:
        """An image as the raw request body, or as the `file` field of a multipart form."""
        check_shard(shard)
        if no_model:
            raise HTTPException(400, no_model)
        return await answer(Query(k=k, shard=shard, image=await upload(request)))

    @app.get("/api/search/key", response_model=Hits, responses=answers(404, 422))
    async def search_key(key: str, k: Annotated[int, k_param] = 10, shard: str | None = None,
                         within: str | None = None) -> dict:
        """More like an indexed image: `key` (and its `shard` when the key is in several);
        `within` limits the hits to one shard."""
        check_shard(within)
        try:
            vector = searcher.key_vector(key, shard)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return await answer(Query(k=k, shard=within, vector=vector))

    vector_body = {"required": True, "content": {"application/json": {"schema": VectorQuery.model_json_schema()}}}

    @app.post("/api/search/vector", response_model=Hits, responses=answers(404, 413, 422),
              openapi_extra={"requestBody": vector_body})
    async def search_vector(request: Request) -> dict:
        """JSON {"vector": [dim numbers], "k": 10, "shard": null}."""
        data = await body(request, vector_limit, f"a vector query is at most {vector_limit} bytes ({dim} numbers)")
        try:
            query = VectorQuery.model_validate_json(data)
        except ValidationError as exc:
            raise HTTPException(422, _vector_message(exc.errors(), dim)) from None
        check_shard(query.shard)
        vector = np.asarray(query.vector, dtype=np.float32)
        if not np.isfinite(vector).all():
            raise HTTPException(422, f"the vector must be {dim} finite numbers (as float32), got one that is not")
        return await answer(Query(k=query.k, shard=query.shard, vector=vector))

    @functools.lru_cache(maxsize=4096)
    def thumbnail(shard: str, key: str) -> bytes | None:
        from imgindex.indexes.gallery import fetch_images, thumbnail_jpeg

        found = fetch_images(searcher.sources(), [(shard, key)], searcher.member_ranges)  # a tar member: its bytes
        return thumbnail_jpeg(found.get((shard, key)))

    a_jpeg = {200: {"description": "a JPEG", "content": {"image/jpeg": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}}

    @app.get("/api/thumbnail", response_class=Response, responses={**a_jpeg, **answers(404, 422)})
    async def get_thumbnail(shard: str, key: str) -> Response:
        """A small JPEG of an indexed sample, read from its source; nothing else is ever opened."""
        try:
            searcher.locate(key, shard)
        except NotFound:
            raise HTTPException(404, f"({shard!r}, {key!r}) is not an indexed sample") from None
        jpeg = await asyncio.get_running_loop().run_in_executor(None, thumbnail, shard, key)
        if jpeg is None:
            raise HTTPException(404, f"the source of ({shard!r}, {key!r}) cannot be read (moved or deleted?)")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return files("imgindex.serve").joinpath("page.html").read_text()

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs(request: Request) -> str:
        given = request.query_params.get("token")
        return _docs_page(app.openapi(), "?" + urlencode({"token": given}) if given else "")

    return app


async def _limited(request, limit: int, refusal: str) -> AsyncIterator[bytes]:
    """The request body chunk by chunk, refused (413) as soon as it passes `limit` bytes: what
    comes after is never read into memory or a temp file."""
    from fastapi import HTTPException

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPException(413, refusal)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, refusal)
        yield chunk


def _validation_message(errors: list[dict]) -> str:
    """FastAPI's validation errors (query parameters) as one sentence."""
    said = []
    for problem in errors:
        where = [str(part) for part in problem.get("loc", ())]
        if where[-1:] == ["k"]:
            said.append(f"k must be a whole number from 1 to {MAX_HITS}, got {problem.get('input')!r}")
        else:
            said.append(f"{' '.join(where[:1])} parameter {'.'.join(where[1:])}: {problem.get('msg')}")
    return "; ".join(said) or "a malformed request"


def _vector_message(errors: list[dict], dim: int) -> str:
    """A vector query's first validation error as one sentence that says what to send."""
    problem = errors[0]
    where = problem["loc"][0] if problem["loc"] else None
    if where == "vector":
        return f"the vector must be {dim} finite numbers: {problem['msg']}"
    if where == "k":
        return f"k must be a whole number from 1 to {MAX_HITS}: {problem['msg']}"
    if where == "shard":
        return f"shard must be a shard's name or null: {problem['msg']}"
    return f'send JSON {{"vector": [{dim} numbers], "k": 10, "shard": null}}: {problem["msg"]}'


def _check_device(device: str | None) -> None:
    """A device that cannot hold a tensor stops the service at start (ConfigError), before it
    answers every image query with the same refusal."""
    import torch

    from imgindex.pipeline.config import load_config
    from imgindex.pipeline.schedule import decide, machine_facts

    where = decide(load_config(None, {"runtime.device": device or "auto"}).runtime, machine_facts()).device
    try:
        torch.zeros(1, device=where)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"--device {device}: {str(exc).splitlines()[0]}") from None


def _docs_page(spec: dict, token_query: str) -> str:
    """The API reference as one self-contained page, built from the OpenAPI document (Swagger UI
    would load its scripts from a CDN, and show nothing offline)."""
    sections = []
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            params = [f"<code>{escape(p['name'])}</code>{'' if p.get('required') else ' (optional)'}"
                      for p in operation.get("parameters", [])]
            bodies = [f"<code>{escape(media)}</code>" for media in operation.get("requestBody", {}).get("content", {})]
            codes = [f"<code>{escape(code)}</code> {escape(r.get('description', ''))}"
                     for code, r in operation.get("responses", {}).items()]
            sections.append(
                f"<section><h2><code>{escape(method.upper())} {escape(path)}</code></h2>"
                f"<p>{escape(operation.get('description') or operation.get('summary', ''))}</p>"
                + (f"<p>parameters: {', '.join(params)}</p>" if params else "")
                + (f"<p>body: {' or '.join(bodies)}</p>" if bodies else "")
                + f"<p>answers: {'; '.join(codes)}</p></section>")
    info = spec.get("info", {})
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(info.get("title", ""))} API'
            f'</title><style>body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }} '
            f'section {{ border-top: 1px solid #ddd; }} h2 {{ font-size: 1.05em; }}</style></head><body>'
            f'<h1>{escape(info.get("title", ""))} API</h1><p>{escape(info.get("description", ""))}</p>'
            f'<p>The OpenAPI document is at <a id="openapi" href="/openapi.json{escape(token_query)}">'
            f'/openapi.json</a>: '
            f'load it into any OpenAPI viewer or client generator. This page is self-contained (no scripts '
            f'from elsewhere), so it works offline. Refusals answer <code>{{"error": "..."}}</code>.</p>'
            + "".join(sections) + "</body></html>")
