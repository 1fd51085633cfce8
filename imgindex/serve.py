"""`imgindex serve`: an index answered over HTTP, as a JSON API and a self-contained web page.

`create_app(index_dir)` loads the index (memory-mapped), its ids and the recorded model once and
returns an ASGI app (FastAPI), which can be served by uvicorn or mounted in another app.
Queries that arrive together are answered together: the images among them go through one
forward pass and every query through one faiss search (QueryBatcher). Nothing a client sends
names a file: thumbnails are read only for (shard, key) pairs the index holds, from the sources
the embeddings recorded.
"""

import asyncio
import functools
import hmac
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np

from imgindex.indexes.query import Searcher
from imgindex.errors import ConfigError
from imgindex.pipeline.decode import SampleError

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_BATCH = 64  # queries answered by one forward and one search


@dataclass
class Query:
    k: int
    shard: str | None
    image: bytes | None = None  # an uploaded image
    vector: np.ndarray | None = None  # a given or stored vector
    future: asyncio.Future = field(default=None, repr=False)


class QueryBatcher:
    """Queries that wait together are answered together, in a thread of their own, one batch at a
    time (so the model and the index see one caller): one forward for the batch's images, one
    search per shard filter. While a batch runs, the next one gathers."""

    def __init__(self, searcher: Searcher, device: str | None = None):
        self.searcher = searcher
        self.device = device
        self.queue: asyncio.Queue[Query] | None = None

    async def ask(self, query: Query) -> list[dict]:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._serve())
        query.future = asyncio.get_running_loop().create_future()
        await self.queue.put(query)
        return await query.future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                answers = await loop.run_in_executor(None, self._answer, batch)
            except Exception as exc:  # the batch's error goes to each of its queries
                for query in batch:
                    if not query.future.done():
                        query.future.set_exception(exc)
                continue
            for query, hits in zip(batch, answers):
                if query.future.done():
                    continue
                if isinstance(hits, Exception):
                    query.future.set_exception(hits)
                else:
                    query.future.set_result(hits)

    def _answer(self, batch: list[Query]) -> list[list[dict] | Exception]:
        """Decode the batch's images here too, in the one thread that runs the forward: decode
        threads beside it would take the cores the forward's threads wait on."""
        answers: list[list[dict] | Exception | None] = [None] * len(batch)
        embedder = self.searcher.embedder(self.device) if any(q.image is not None for q in batch) else None
        decoded = []
        for i, query in enumerate(batch):
            if query.image is not None:
                try:
                    decoded.append((i, embedder.pixels(query.image)))
                except SampleError as exc:
                    answers[i] = exc
        if decoded:
            vectors = embedder.embed_pixels([pixels for _, pixels in decoded], MAX_BATCH)
            for (i, _), vector in zip(decoded, vectors):
                batch[i].vector = vector
        for shard in dict.fromkeys(q.shard for q in batch):
            members = [i for i, q in enumerate(batch) if q.shard == shard and answers[i] is None]
            if not members:
                continue
            k = max(batch[i].k for i in members)
            hits = self.searcher.search_vectors(np.stack([batch[i].vector for i in members]), k, shard=shard)
            for i, found in zip(members, hits):
                answers[i] = [h.to_dict() for h in found[:batch[i].k]]
        return answers


def create_app(index_dir: str | Path, token: str | None = None, max_upload: int = 20 * 2**20,
               device: str | None = None):
    """The service for one index: JSON API under /api, the page at /, OpenAPI at /docs."""
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.responses import HTMLResponse, JSONResponse, Response
    except ImportError:
        raise ConfigError("imgindex serve needs its extra: pip install 'imgindex[serve]'") from None

    searcher = Searcher(index_dir)
    try:
        searcher.embedder(device)  # the recorded model, loaded once, before the first query
        no_model = None
    except ConfigError as exc:  # e.g. synthetic vectors: key and vector queries still work
        no_model = str(exc)
    batcher = QueryBatcher(searcher, device)
    manifest = searcher.manifest
    app = FastAPI(title="imgindex", description=f"Search the index at {index_dir}", version="1")
    app.state.searcher, app.state.batcher = searcher, batcher

    @app.exception_handler(HTTPException)
    async def error_json(request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
                request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "a bearer token is required (Authorization: Bearer TOKEN, or "
                                              "?token=TOKEN)"}, status_code=401)
        return await call_next(request)

    def check_k(k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k must be from 1 to {MAX_K}, got {k}")
        return k

    def check_shard(shard: str | None) -> str | None:
        if shard is not None:
            try:
                searcher.shard_rows(shard)
            except ConfigError as exc:
                raise HTTPException(404, str(exc)) from None
        return shard

    async def answer(query: Query) -> dict:
        try:
            return {"hits": await batcher.ask(query)}
        except ConfigError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/api/health")
    async def health() -> dict:
        return {"status": "ok", "count": int(searcher.index.ntotal)}

    @app.get("/api/info")
    async def info() -> dict:
        emb = manifest["embeddings"]
        return {"model": emb["model"]["name"], "weights": {k: emb["weights"].get(k) for k in ("source", "sha256")},
                "count": manifest["count"], "dim": manifest["dim"], "factory": manifest["factory"],
                "recall_at_10": manifest.get("recall_at_10"), "search_params": manifest.get("search_params"),
                "shards": len(manifest["parts"])}

    @app.post("/api/search/image")
    async def search_image(request: Request, k: int = 10, shard: str | None = None) -> dict:
        """An image as the raw request body, or as the `file` field of a multipart form."""
        check_k(k)
        check_shard(shard)
        if no_model:
            raise HTTPException(400, no_model)
        data = await _upload(request, max_upload, HTTPException)
        try:
            return await answer(Query(k=k, shard=shard, image=data))
        except SampleError as exc:
            raise HTTPException(413 if exc.kind == "too_large" else 422, f"{exc.kind}: {exc}") from None

    @app.get("/api/search/key")
    async def search_key(key: str, k: int = 10, shard: str | None = None, within: str | None = None) -> dict:
        """More like an indexed image: `key` (and its `shard` when the key is in several);
        `within` limits the hits to one shard."""
        check_k(k)
        check_shard(within)
        try:
            vector = searcher.key_vector(key, shard)
        except ConfigError as exc:
            raise HTTPException(404, str(exc)) from None
        return await answer(Query(k=k, shard=within, vector=vector))

    @app.post("/api/search/vector")
    async def search_vector(request: Request) -> dict:
        """JSON {"vector": [...], "k": 10, "shard": null}."""
        try:
            body = await request.json()
            vector = np.asarray(body["vector"], dtype=np.float32)
            k, shard = int(body.get("k", 10)), body.get("shard")
        except (ValueError, KeyError, TypeError):
            raise HTTPException(422, 'send JSON {"vector": [numbers], "k": 10}') from None
        check_k(k)
        check_shard(shard)
        if vector.shape != (searcher.index.d,) or not np.isfinite(vector).all():
            raise HTTPException(422, f"the vector must be {searcher.index.d} finite numbers, got shape "
                                     f"{list(vector.shape)}")
        return await answer(Query(k=k, shard=shard, vector=vector))

    @functools.lru_cache(maxsize=4096)
    def thumbnail(shard: str, key: str) -> bytes | None:
        from imgindex.indexes.gallery import fetch_images, thumbnail_jpeg

        return thumbnail_jpeg(fetch_images(searcher.sources(), [(shard, key)]).get((shard, key)))

    @app.get("/api/thumbnail")
    async def get_thumbnail(shard: str, key: str) -> Response:
        """A small JPEG of an indexed sample, read from its source; nothing else is ever opened."""
        try:
            searcher.locate(key, shard)
        except ConfigError:
            raise HTTPException(404, f"({shard!r}, {key!r}) is not an indexed sample") from None
        jpeg = await asyncio.get_running_loop().run_in_executor(None, thumbnail, shard, key)
        if jpeg is None:
            raise HTTPException(404, f"the source of ({shard!r}, {key!r}) cannot be read (moved or deleted?)")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return files("imgindex").joinpath("page.html").read_text()

    return app


async def _upload(request, limit: int, HTTPException) -> bytes:
    """The image bytes of a request, refused past `limit` without reading further."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + 4096:
        raise HTTPException(413, f"the upload is over the limit of {limit} bytes (--max-upload)")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "read"):
            raise HTTPException(422, "send the image as the `file` field of the form, or as the raw body")
        data = await upload.read(limit + 1)
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"the upload is over the limit of {limit} bytes (--max-upload)")
            chunks.append(chunk)
        data = b"".join(chunks)
    if len(data) > limit:
        raise HTTPException(413, f"the upload is over the limit of {limit} bytes (--max-upload)")
    if not data:
        raise HTTPException(422, "empty upload: send an image")
    return data


def serve(index_dir: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_upload: int = 20 * 2**20, device: str | None = None) -> None:
    """Serve until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("imgindex serve needs its extra: pip install 'imgindex[serve]'") from None
    app = create_app(index_dir, token=token, max_upload=max_upload, device=device)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving %s on %s without --token: anyone who reaches this address can query the index and "
                    "read its thumbnails", index_dir, host)
    print(f"imgindex: serving {index_dir} ({app.state.searcher.index.ntotal} images) at http://{host}:{port}/ "
          f"(API docs at /docs); Ctrl-C to stop", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
