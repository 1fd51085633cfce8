"""Query an index directory: load it once, then search by vectors or keys. Images become vectors
through the image model the caller composes the Searcher with (the command line and the service
give the one the index's manifest records: pipeline.query_embedder); indexes load no model.

Hits carry rank, score (cosine), shard and key, and the passthrough metadata read from the
embeddings parts (caption, url) plus a `path` that says where the image lives: the file
for folders and lists, `TAR#KEY` for tar shards, `FILE.parquet#KEY` for Parquet rows.
"""
from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgindex.formats.embeddings_dir import EmbeddingsDir, normalize_rows
from imgindex.indexes.factory import range_params, search_knob, set_knob
from imgindex.formats.index_dir import IndexDir
from imgindex.formats.records import EmbeddingsManifest, ShardStats
from imgindex.errors import ConfigError, NotFound
from imgindex.formats.samples import sample_location

log = logging.getLogger(__name__)


@dataclass
class Hit:
    rank: int
    score: float
    shard: str
    key: str
    path: str | None = None
    url: str | None = None
    caption: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ImageModel(Protocol):
    """Encoded images -> vectors, exactly as the index's embeddings were made."""

    def embed_files(self, paths: list[str | Path]) -> np.ndarray: ...  # a file it cannot use: ConfigError
    def pixels(self, data: bytes) -> np.ndarray: ...  # the model's input; SampleError for no usable image
    def embed_pixels(self, pixels: list[np.ndarray], batch_size: int = 32) -> np.ndarray: ...
    def picture(self, data: bytes): ...  # the upright RGB PIL image the job decodes; SampleError
    def phash(self, picture) -> int: ...  # the 64-bit perceptual hash the parts record


class _Sorted:
    """A sorted Arrow string column as a sequence `bisect` can search, one value read per probe."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> str:
        return self.column[i].as_py()


class Searcher:
    """An index loaded once (memory-mapped where the type allows) and its row -> (shard, key) map.
    `image_model`: called once, with the embeddings manifest, the first time an image is asked
    about (`embedder()`); without one, only vectors and keys can be searched."""

    def __init__(self, index_dir: str | Path, mmap: bool = True, params: dict | None = None,
                 model: str | None = None, image_model: Callable[[EmbeddingsManifest], ImageModel] | None = None):
        self.dir = IndexDir(index_dir)
        self.manifest = self.dir.read_manifest()
        built_with = self.manifest.embeddings.model.name
        if model and model != built_with:
            raise ConfigError(f"the index at {index_dir} was built with {built_with}, not {model}: "
                              "query it without --model, or pass the matching index")
        self.index = self.dir.load_index(self.manifest, mmap=mmap)
        self.ids = self.dir.read_ids(self.manifest)
        self.keys = self.dir.read_keys(self.manifest)
        self.knob = search_knob(self.index)
        settings = {**self.manifest.search_params, **(params or {})}
        set_knob(self.index, self.knob, settings.get(self.knob) if self.knob else None)
        self.shard_dirs = {p.shard: p.dir for p in self.manifest.parts}
        self._dirs: dict[str, EmbeddingsDir | None] = {}
        self._sources: dict[str, ShardStats] | None = None
        self._image_model = image_model
        self._embedder: ImageModel | None = None
        self._missing: set[str] = set()  # shards whose part is gone (warned once each)
        self._shard_rows: dict[str, tuple[int, int]] = {}

    def embeddings_for(self, shard: str) -> EmbeddingsDir | None:
        """The embeddings directory holding a shard's part, if it is still there."""
        return self._open(self.shard_dirs.get(shard, self.manifest.embeddings_dir))

    def _open(self, where: str) -> EmbeddingsDir | None:
        if where not in self._dirs:
            try:
                self._dirs[where] = EmbeddingsDir(where)
            except ConfigError:
                log.warning("embeddings directory %s is gone: its hits carry no captions or paths", where)
                self._dirs[where] = None
        return self._dirs[where]

    def sources(self) -> dict[str, ShardStats]:
        """shard -> its stats (kind, source URL), from every embeddings directory of the index."""
        if self._sources is None:
            self._sources = {}
            for where in dict.fromkeys(self.shard_dirs.values()):
                emb = self._open(where)
                if emb is not None:
                    self._sources.update(emb.shard_sources())
        return self._sources

    def shard_rows(self, shard: str) -> tuple[int, int]:
        """The index rows of one shard: [start, end) (parts are added whole and in the manifest's
        order, so they are contiguous and known without reading the ids)."""
        if not self._shard_rows:
            start = 0
            for part in self.manifest.parts:
                self._shard_rows[part.shard] = (start, start + int(part.rows))
                start += int(part.rows)
        if shard not in self._shard_rows:
            raise NotFound(f"shard {shard!r} is not in the index")
        return self._shard_rows[shard]

    def search(self, vectors: np.ndarray, k: int = 10, shard: str | None = None) -> pa.Table:
        """Batch API: one row per hit (query, rank, score, shard, key), built without Python loops;
        with `shard`, only that shard's images are searched."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2 or vectors.shape[1] != self.index.d:
            raise ConfigError(f"query vectors have dim {vectors.shape[-1]}, the index has {self.index.d}")
        if shard is None:
            scores, rows = self.index.search(normalize_rows(vectors), k)
        else:
            scores, rows = self.index.search(normalize_rows(vectors), k, params=range_params(self.index, *self.shard_rows(shard)))
        valid = rows >= 0
        ranks = np.cumsum(valid, axis=1)
        picked = self.ids.take(rows[valid])
        return pa.table({
            "query": np.nonzero(valid)[0].astype(np.int32), "rank": ranks[valid].astype(np.int32),
            "score": scores[valid], "shard": picked["shard"], "key": picked["key"],
        })

    def search_vectors(self, vectors: np.ndarray, k: int = 10, with_metadata: bool = True,
                       shard: str | None = None) -> list[list[Hit]]:
        """Top-k Hits per query vector; with_metadata adds caption, url and path (one read per shard)."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        table = self.search(vectors, k, shard=shard).to_pydict()
        results: list[list[Hit]] = [[] for _ in range(len(vectors))]
        for q, rank, score, shard, key in zip(table["query"], table["rank"], table["score"], table["shard"],
                                              table["key"]):
            results[q].append(Hit(rank=rank, score=float(score), shard=shard, key=key))
        if with_metadata:
            self._add_metadata([hit for hits in results for hit in hits])
        return results

    def _add_metadata(self, hits: list[Hit]) -> None:
        by_shard: dict[str, list[Hit]] = {}
        for hit in hits:
            by_shard.setdefault(hit.shard, []).append(hit)
        for shard, shard_hits in by_shard.items():
            emb = self.embeddings_for(shard)
            if emb is None:
                continue
            rows = emb.rows_for(shard, [h.key for h in shard_hits], ["caption", "url"])
            if rows is None:
                if shard not in self._missing:
                    self._missing.add(shard)
                    log.warning("the part of shard %s is missing from %s: its hits carry no caption, url or path",
                                shard, emb.url)
                continue
            stats = self.sources().get(shard)
            for hit in shard_hits:
                row = rows.get(hit.key, {})
                hit.caption, hit.url = row.get("caption"), row.get("url")
                hit.path = sample_location(stats.kind, stats.source, hit.key) if stats else None

    def member_ranges(self, shard: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        """key -> (offset, size) of its image member in an uncompressed tar, where the part records it."""
        emb = self.embeddings_for(shard)
        if emb is None:
            return {}
        rows = emb.rows_for(shard, keys, ["member_offset", "bytes"]) or {}
        return {key: (row["member_offset"], row["bytes"]) for key, row in rows.items()
                if row["member_offset"] is not None and row["bytes"] is not None}

    def locate(self, key: str, shard: str | None = None) -> tuple[str, str]:
        """(shard, key) of a key in the index; ambiguous keys need a shard. A binary search of the
        sorted keys (O(log N) reads of the mapped files, one per --add segment); a scan of the ids
        for older indexes."""
        if self.keys is not None:
            shards = []
            for keys in self.keys:  # the build's sorted keys, then each --add segment's
                column = _Sorted(keys["key"])
                lo, hi = bisect.bisect_left(column, key), bisect.bisect_right(column, key)
                shards += keys["shard"][lo:hi].to_pylist()
            if shard:
                shards = [s for s in shards if s == shard]
        else:
            mask = pc.equal(self.ids["key"], key)
            if shard:
                mask = pc.and_(mask, pc.equal(self.ids["shard"], shard))
            shards = self.ids.filter(mask)["shard"].to_pylist()
        if not shards:
            raise NotFound(f"key {key!r} is not in the index" + (f" (shard {shard})" if shard else ""))
        if len(set(shards)) > 1:
            raise ConfigError(f"key {key!r} is in several shards ({', '.join(sorted(set(shards)))}): pass --shard")
        return shards[0], key

    def key_vector(self, key: str, shard: str | None = None) -> np.ndarray:
        """The stored full-precision vector of an indexed key."""
        found_shard, found_key = self.locate(key, shard)
        emb = self.embeddings_for(found_shard)
        if emb is None:
            raise NotFound("searching by key needs the embeddings directory the index was built from, which is gone")
        return emb.vector_of(found_shard, found_key)

    def search_keys(self, keys: list[str], k: int = 10, shard: str | None = None) -> list[list[Hit]]:
        """"More like this one": the stored full-precision vector of each key is the query."""
        return self.search_vectors(np.stack([self.key_vector(key, shard) for key in keys]), k)

    def embedder(self) -> ImageModel:
        """The index's image model (images -> vectors), made once."""
        if self._embedder is None:
            if self._image_model is None:
                raise ConfigError("searching by image needs the index's model, and this index was opened without "
                                  "one: query by vector or key")
            self._embedder = self._image_model(self.manifest.embeddings)
        return self._embedder

    def search_images(self, paths: list[str | Path], k: int = 10) -> list[list[Hit]]:
        """Embed image files with the index's image model, then search."""
        return self.search_vectors(self.embedder().embed_files(paths), k)
