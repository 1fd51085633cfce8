"""The embeddings directory: manifest, one Parquet part per shard, failures, stats markers.

Every file appears whole or not at all: locally it is written under a hidden temporary
name that no `*.parquet` glob sees and renamed into place; on object stores (no rename)
it is sent in one PUT. The stats marker is written last and marks the shard as done.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.errors import ConfigError

MANIFEST = "_manifest.json"
EMBEDDINGS = "embeddings"
FAILURES = "failures"
STATS = "_stats"

# Manifest fields that decide what the vectors are; a run that differs in any of them
# must not add parts to the same directory.
IDENTITY_FIELDS = ("model", "weights", "data_config", "preprocess", "dim", "dtype",
                   "normalized", "precision", "decode")

FAILURE_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("member", pa.string()),
    ("error", pa.string()), ("message", pa.string()),
])


def part_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)), ("key_bytes", pa.binary()),
        ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()), ("grayscale", pa.bool_()),
        ("sha256", pa.string()), ("phash", pa.int64()),
        ("caption", pa.string()), ("json", pa.string()), ("url", pa.string()),
    ])


def identity(manifest: dict) -> dict:
    ident = {name: manifest.get(name) for name in IDENTITY_FIELDS}
    ident["weights"] = {"sha256": (manifest.get("weights") or {}).get("sha256")}
    ident["model"] = {"name": (manifest.get("model") or {}).get("name")}
    return ident


def identity_changes(old: dict, new: dict) -> list[str]:
    """The identity fields in which two manifests differ (empty: same vectors)."""
    a, b = identity(old), identity(new)
    return [name for name in IDENTITY_FIELDS if a.get(name) != b.get(name)]


class EmbeddingStore:
    """Reads and writes one embeddings directory (a local path or an fsspec URL)."""

    def __init__(self, out: str):
        self.url = out
        self.fs, self.root = fsspec.core.url_to_fs(out)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    def part_path(self, shard: str) -> str:
        return self.path(EMBEDDINGS, f"part-{shard}.parquet")

    def failures_path(self, shard: str) -> str:
        return self.path(FAILURES, f"part-{shard}.parquet")

    def stats_path(self, shard: str) -> str:
        return self.path(STATS, f"part-{shard}.json")

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
        """Fail before any work if OUT cannot be created or written."""
        probe = self.path(f".imgindex-write-test-{uuid.uuid4().hex}")  # unique: --procs children probe at once
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except OSError as exc:
            raise ConfigError(f"cannot write to output {self.url!r} ({type(exc).__name__}: {exc}): "
                              "choose another --out") from None

    def read_manifest(self) -> dict | None:
        path = self.path(MANIFEST)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rt") as f:
            return json.load(f)

    def prepare(self, manifest: dict, overwrite: bool) -> None:
        """Start or resume a job: refuse to mix vectors from a different model or preprocessing."""
        existing = self.read_manifest()
        if existing is not None and overwrite:
            self.clear()
            existing = None
        elif existing is not None and identity_changes(existing, manifest):
            changed = ", ".join(identity_changes(existing, manifest))
            raise ConfigError(
                f"{self.url} holds embeddings made differently (changed: {changed}); "
                "use a new --out, or --overwrite to delete them and start again"
            )
        elif existing is None and not overwrite and self._has_parts():
            raise ConfigError(f"{self.url} holds parts but no {MANIFEST}: use a new --out, or --overwrite")
        for sub in (EMBEDDINGS, FAILURES, STATS):
            self.fs.makedirs(self.path(sub), exist_ok=True)
        if existing is None:
            self._put(self.path(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode(), shared=True)

    def clear(self) -> None:
        """Delete every part, failure, stats marker and the manifest (for --overwrite)."""
        for sub in (EMBEDDINGS, FAILURES, STATS):
            if self.fs.exists(self.path(sub)):
                self.fs.rm(self.path(sub), recursive=True)
        if self.fs.exists(self.path(MANIFEST)):
            self.fs.rm_file(self.path(MANIFEST))

    def _has_parts(self) -> bool:
        return bool(self.fs.exists(self.path(EMBEDDINGS)) and self.fs.glob(self.path(EMBEDDINGS, "*.parquet")))

    def done_shards(self) -> set[str]:
        """Shards whose stats marker exists: complete, skipped on a rerun."""
        found = self.fs.glob(self.path(STATS, "part-*.json")) if self.fs.exists(self.path(STATS)) else []
        return {PurePosixPath(p).name[len("part-"):-len(".json")] for p in found}

    def read_stats(self) -> list[dict]:
        stats = []
        for path in sorted(self.fs.glob(self.path(STATS, "part-*.json"))):
            with self.fs.open(path, "rt") as f:
                stats.append(json.load(f))
        return stats

    @staticmethod
    def _parquet_bytes(table: pa.Table, row_group_rows: int | None = None) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows)
        return sink.getvalue().to_pybytes()

    def write_shard(self, shard: str, rows: dict[str, list], embeddings: np.ndarray,
                    failures: list[dict], stats: dict) -> None:
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
        self._put(self.stats_path(shard), json.dumps(stats, indent=2, sort_keys=True).encode())
