"""Reading an embeddings directory: its manifest, its parts with their row counts, vectors in
bounded batches, a seeded random sample of rows, and per-shard metadata and sources."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.errors import ConfigError
from imgindex.pipeline.writer import EMBEDDINGS, MANIFEST, STATS



@dataclass(frozen=True)
class Part:
    shard: str
    path: str
    rows: int


def _vectors(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class EmbeddingsDir:
    """One embeddings directory written by `imgindex embed` (local path or fsspec URL)."""

    def __init__(self, url: str):
        self.url = url
        self.location = url if "://" in url else str(Path(url).resolve())  # as recorded in index manifests
        self.fs, self.root = fsspec.core.url_to_fs(url)
        manifest_path = str(PurePosixPath(self.root, MANIFEST))
        if not self.fs.exists(manifest_path):
            raise ConfigError(f"{url} is not an embeddings directory (no {MANIFEST}): run `imgindex embed` first")
        try:
            with self.fs.open(manifest_path, "rt") as f:
                self.manifest = json.load(f)
        except ValueError as exc:
            raise ConfigError(f"{url}/{MANIFEST} is not valid JSON ({exc}): re-embed into a new --out") from None
        dim = self.manifest.get("dim") if isinstance(self.manifest, dict) else None
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ConfigError(f"{url}/{MANIFEST} is damaged (no dimension recorded): re-embed into a new --out")
        self.dim = dim
        self.normalized = bool(self.manifest.get("normalized"))

    def parts(self) -> list[Part]:
        """Complete parts (those with a stats marker), sorted by shard, with row counts from metadata."""
        done = {PurePosixPath(p).name for p in self.fs.glob(str(PurePosixPath(self.root, STATS, "part-*.json")))}
        found = []
        for path in sorted(self.fs.glob(str(PurePosixPath(self.root, EMBEDDINGS, "part-*.parquet")))):
            name = PurePosixPath(path).name
            if name.replace(".parquet", ".json") not in done:
                continue
            rows = pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows
            found.append(Part(shard=name[len("part-"):-len(".parquet")], path=path, rows=rows))
        return found

    def part(self, shard: str, rows: int) -> Part:
        """A part known by name (e.g. from an index manifest)."""
        path = str(PurePosixPath(self.root, EMBEDDINGS, f"part-{shard}.parquet"))
        if not self.fs.exists(path):
            raise ConfigError(f"part of shard {shard!r} is missing from {self.url}")
        return Part(shard=shard, path=path, rows=rows)

    def iter_batches(self, parts: list[Part], normalize: bool = True) -> Iterator[tuple[Part, pa.Table, np.ndarray]]:
        """(part, shard+key table, float32 vectors), one Parquet row group at a time.

        Row groups are read one by one, single-threaded, without pre-buffering: the least
        memory pyarrow needs (parts are written in ~32 MB row groups).
        """
        for part in parts:
            reader = pq.ParquetFile(part.path, filesystem=self.fs, pre_buffer=False)
            for group in range(reader.num_row_groups):
                table = reader.read_row_group(group, columns=["shard", "key", "embedding"], use_threads=False)
                vectors = _vectors(table.column("embedding"), self.dim)
                if normalize and not self.normalized:
                    vectors = normalize_rows(vectors)
                yield part, table.select(["shard", "key"]), vectors

    def sample(self, parts: list[Part], count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """`count` rows drawn uniformly without replacement: (global row ids, vectors)."""
        total = sum(p.rows for p in parts)
        count = min(count, total)
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
        taken = []
        offset = 0
        for _, _, vectors in self.iter_batches(parts):
            lo, hi = np.searchsorted(chosen, [offset, offset + len(vectors)])
            if hi > lo:
                taken.append(vectors[chosen[lo:hi] - offset])
            offset += len(vectors)
        vectors = np.concatenate(taken) if taken else np.zeros((0, self.dim), np.float32)
        return chosen, np.ascontiguousarray(vectors)

    def shard_sources(self) -> dict[str, dict]:
        """shard -> its stats (kind and source URL among them)."""
        out = {}
        for path in self.fs.glob(str(PurePosixPath(self.root, STATS, "part-*.json"))):
            with self.fs.open(path, "rt") as f:
                stats = json.load(f)
            out[stats["shard"]] = stats
        return out

    def digest(self, part: Part) -> dict | None:
        """Size and digests of a part's file (local directories; None for remote ones)."""
        from imgindex.indexes.index_dir import file_digest

        return file_digest(Path(part.path)) if self.location == str(Path(self.url).resolve()) else None

    def rows_for(self, shard: str, keys: list[str], columns: list[str]) -> dict[str, dict] | None:
        """key -> the requested columns of that key's row in `shard`'s part; None if the part is gone."""
        path = str(PurePosixPath(self.root, EMBEDDINGS, f"part-{shard}.parquet"))
        if not self.fs.exists(path):
            return None
        table = pq.read_table(path, filesystem=self.fs, columns=["key", *columns], filters=[("key", "in", list(keys))])
        return {row["key"]: row for row in table.to_pylist()}

    def read_columns(self, shard: str, columns: list[str]) -> pa.Table:
        """Some columns of a shard's part; a column the part predates comes back as nulls."""
        from imgindex.pipeline.writer import part_schema

        parquet = pq.ParquetFile(self.part(shard, 0).path, filesystem=self.fs)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        table = parquet.read(columns=present)
        schema = part_schema(self.dim)
        return pa.table({c: table[c] if c in present else pa.nulls(table.num_rows, schema.field(c).type)
                         for c in columns})

    def vector_of(self, shard: str, key: str) -> np.ndarray:
        """The stored full-precision vector of one sample (normalized for cosine search)."""
        table = pq.read_table(self.part(shard, 0).path, filesystem=self.fs, columns=["key", "embedding"],
                              filters=[("key", "=", key)])
        if not table.num_rows:
            raise ConfigError(f"key {key!r} is not in shard {shard!r} of {self.url}")
        return normalize_rows(_vectors(table.column("embedding"), self.dim))[0]
