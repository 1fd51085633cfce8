"""The embeddings directory, both sides of it: its layout, the failures schema, the writer the
job uses (EmbeddingStore: the manifest, atomic parts, failures, stats marker last) and the reader
the indexes use (EmbeddingsDir: the manifest and stats markers, parts with row counts, vector
batches, seeded samples, metadata). What the manifest, a stats marker and a part's row hold is
formats/records.py's.

Every file appears whole or not at all: locally it is written under a hidden temporary
name that no `*.parquet` glob sees and renamed into place; on object stores (no rename)
it is sent in one PUT. The stats marker is written last and marks the shard as done.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.errors import ConfigError, NotFound
from imgindex.formats.records import EmbeddingsManifest, ShardStats, part_schema

MANIFEST = "_manifest.json"
EMBEDDINGS = "embeddings"
FAILURES = "failures"
STATS = "_stats"

FAILURE_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("member", pa.string()),
    ("error", pa.string()), ("message", pa.string()),
])


class Layout:
    """Where everything of one embeddings directory (a local path or an fsspec URL) lives."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    def part_path(self, shard: str) -> str:
        return self.path(EMBEDDINGS, f"part-{shard}.parquet")

    def failures_path(self, shard: str) -> str:
        return self.path(FAILURES, f"part-{shard}.parquet")

    def stats_path(self, shard: str) -> str:
        return self.path(STATS, f"part-{shard}.json")

    def read_manifest(self) -> EmbeddingsManifest | None:
        """The manifest (None when there is none yet); a damaged one is Corrupt."""
        path = self.path(MANIFEST)
        if not self.fs.exists(path):
            return None
        return EmbeddingsManifest.from_json(self.fs.cat_file(path), f"{self.url}/{MANIFEST}")

    def done_shards(self) -> set[str]:
        """Shards whose stats marker exists: complete (skipped on a rerun, read by indexes)."""
        found = self.fs.glob(self.path(STATS, "part-*.json")) if self.fs.exists(self.path(STATS)) else []
        return {PurePosixPath(p).name[len("part-"):-len(".json")] for p in found}

    def read_stats(self) -> list[ShardStats]:
        """Every stats marker; a damaged one is Corrupt."""
        return [ShardStats.from_json(self.fs.cat_file(path), path)
                for path in sorted(self.fs.glob(self.path(STATS, "part-*.json")))]


class EmbeddingStore(Layout):
    """Writes one embeddings directory: the job's side."""

    def _put(self, path: str, data: bytes, shared: bool = False) -> None:
        """Write `path` whole or not at all. `shared`: other processes may write the same file at
        the same moment (the manifest, from --procs children and cluster slices), so each writes
        a temporary file of its own; otherwise a crashed run's temporary file is reused."""
        if self.local:
            parent, name = os.path.split(path)
            tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp" if shared else f".{name}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def check_writable(self) -> None:
        """Fail before any work if OUT cannot be created or written; a local OUT that does not
        exist yet is not created here (a job stopped by a later check leaves nothing behind)."""
        if self.local and not self.fs.exists(self.root):
            parent = Path(self.root).parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"cannot write to output {self.url!r} ({parent} is not a writable folder): "
                                  "choose another --out")
            return
        probe = self.path(f".imgindex-write-test-{uuid.uuid4().hex}")  # unique: --procs children probe at once
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except OSError as exc:
            raise ConfigError(f"cannot write to output {self.url!r} ({type(exc).__name__}: {exc}): "
                              "choose another --out") from None

    def prepare(self, manifest: EmbeddingsManifest, overwrite: bool) -> None:
        """Start or resume a job: refuse to mix vectors from a different model or preprocessing."""
        existing = self.read_manifest()
        if existing is not None and overwrite:
            self.clear()
            existing = None
        elif existing is not None and existing.identity_changes(manifest):
            changed = ", ".join(existing.identity_changes(manifest))
            raise ConfigError(
                f"{self.url} holds embeddings made differently (changed: {changed}); "
                "use a new --out, or --overwrite to delete them and start again"
            )
        elif existing is None and not overwrite and self._has_parts():
            raise ConfigError(f"{self.url} holds parts but no {MANIFEST}: use a new --out, or --overwrite")
        for sub in (EMBEDDINGS, FAILURES, STATS):
            self.fs.makedirs(self.path(sub), exist_ok=True)
        if existing is None:
            self._put(self.path(MANIFEST), manifest.to_json(), shared=True)

    def clear(self) -> None:
        """Delete every part, failure, stats marker and the manifest (for --overwrite)."""
        for sub in (EMBEDDINGS, FAILURES, STATS):
            if self.fs.exists(self.path(sub)):
                self.fs.rm(self.path(sub), recursive=True)
        if self.fs.exists(self.path(MANIFEST)):
            self.fs.rm_file(self.path(MANIFEST))

    def _has_parts(self) -> bool:
        return bool(self.fs.exists(self.path(EMBEDDINGS)) and self.fs.glob(self.path(EMBEDDINGS, "*.parquet")))

    @staticmethod
    def _parquet_bytes(table: pa.Table, row_group_rows: int | None = None) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows)
        return sink.getvalue().to_pybytes()

    def write_shard(self, shard: str, rows: dict[str, list], embeddings: np.ndarray,
                    failures: list[dict], stats: ShardStats) -> None:
        """Write the part, then its failures, then the stats marker (last: the shard is done).

        A shard where every sample failed has no embeddings part (empty Parquet files trip
        some readers); its stats marker says rows: 0.
        """
        if len(embeddings):
            dim = embeddings.shape[1]
            flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).ravel(), pa.float32())
            columns = dict(rows)
            columns["shard"] = [shard] * len(embeddings)
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
            table = pa.Table.from_pydict(columns, schema=part_schema(dim))
            # ~32 MB row groups: readers stream a part without holding it whole
            self._put(self.part_path(shard), self._parquet_bytes(table, max(1024, 2**25 // (4 * dim))))
        if failures:
            table = pa.Table.from_pylist([{**f, "shard": shard} for f in failures], schema=FAILURE_SCHEMA)
            self._put(self.failures_path(shard), self._parquet_bytes(table))
        self._put(self.stats_path(shard), stats.to_json())


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


class EmbeddingsDir(Layout):
    """Reads one embeddings directory written by `imgindex embed`: the indexes' side."""

    def __init__(self, url: str):
        super().__init__(url)
        self.location = url if "://" in url else str(Path(url).resolve())  # as recorded in index manifests
        manifest = self.read_manifest()
        if manifest is None:
            raise ConfigError(f"{url} is not an embeddings directory (no {MANIFEST}): run `imgindex embed` first")
        self.manifest = manifest
        self.dim = manifest.dim
        self.normalized = manifest.normalized

    def parts(self) -> list[Part]:
        """Complete parts (those with a stats marker), sorted by shard, with row counts from metadata."""
        done = self.done_shards()
        found = []
        for path in sorted(self.fs.glob(self.path(EMBEDDINGS, "part-*.parquet"))):
            shard = PurePosixPath(path).name[len("part-"):-len(".parquet")]
            if shard in done:
                found.append(Part(shard=shard, path=path, rows=pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows))
        return found

    def part(self, shard: str, rows: int) -> Part:
        """A part known by name and row count (e.g. from an index manifest)."""
        return Part(shard=shard, path=self.existing_part_path(shard), rows=rows)

    def existing_part_path(self, shard: str) -> str:
        """The path of a shard's part, which must be there."""
        path = self.part_path(shard)
        if not self.fs.exists(path):
            raise ConfigError(f"part of shard {shard!r} is missing from {self.url}")
        return path

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

    def shard_sources(self) -> dict[str, ShardStats]:
        """shard -> its stats (kind and source URL among them)."""
        return {stats.shard: stats for stats in self.read_stats()}

    def digest(self, part: Part) -> dict | None:
        """Size and digests of a part's file (local directories; None for remote ones)."""
        from imgindex.formats.index_dir import file_digest

        return file_digest(Path(part.path)) if self.location == str(Path(self.url).resolve()) else None

    def rows_for(self, shard: str, keys: list[str], columns: list[str]) -> dict[str, dict] | None:
        """key -> the requested columns of that key's row in `shard`'s part (None for a column the
        part predates); None if the part is gone."""
        path = self.part_path(shard)
        if not self.fs.exists(path):
            return None
        present = [c for c in columns if c in pq.read_schema(path, filesystem=self.fs).names]
        table = pq.read_table(path, filesystem=self.fs, columns=["key", *present], filters=[("key", "in", list(keys))])
        return {row["key"]: {**dict.fromkeys(columns), **row} for row in table.to_pylist()}

    def read_columns(self, shard: str, columns: list[str]) -> pa.Table:
        """Some columns of a shard's part; a column the part predates comes back as nulls."""
        parquet = pq.ParquetFile(self.existing_part_path(shard), filesystem=self.fs)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        table = parquet.read(columns=present)
        schema = part_schema(self.dim)
        return pa.table({c: table[c] if c in present else pa.nulls(table.num_rows, schema.field(c).type)
                         for c in columns})

    def vector_of(self, shard: str, key: str) -> np.ndarray:
        """The stored full-precision vector of one sample (normalized for cosine search)."""
        table = pq.read_table(self.existing_part_path(shard), filesystem=self.fs, columns=["key", "embedding"],
                              filters=[("key", "=", key)])
        if not table.num_rows:
            raise NotFound(f"key {key!r} is not in shard {shard!r} of {self.url}")
        return normalize_rows(_vectors(table.column("embedding"), self.dim))[0]
