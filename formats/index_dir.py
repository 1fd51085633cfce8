"""The index directory: index.faiss, ids.parquet (row i -> shard, key) and manifest.json.

Loading checks that the three agree, and turns every way a directory can be wrong
(missing, not an index, truncated or corrupt file, interrupted update) into one clear line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import faiss
import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.errors import ConfigError

INDEX = "index.faiss"
IDS = "ids.parquet"
MANIFEST = "manifest.json"
FORMAT = "imgindex.index/1"
IDS_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string())])


def faiss_reason(exc: BaseException, limit: int = 120) -> str:
    """faiss's own words from one of its C++ exceptions, without the function signature and
    source path it starts with, cut at a word boundary."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.rsplit("Error: ", 1)[-1] if "Error: " in text else re.sub(r"^Error in .*? at \S+: ", "", text)
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


REQUIRED = {"embeddings": dict, "embeddings_dir": str, "count": int, "dim": int, "parts": list, "factory": str}
SAMPLE_BLOCK = 64 * 1024
SAMPLE_BLOCKS = 64  # besides the first and last blocks; files up to 66 blocks are read whole
# Files up to this size are hashed whole when an index loads (well under a second); larger ones are
# checked by size and the sampled digest, which misses changes that fall between its blocks.
FULL_CHECK_BYTES = 256 * 2**20


def file_digest(path: Path, full: bool = True) -> dict:
    """{"bytes", "sampled_sha256"} (and "sha256" with `full`). The sampled digest reads the first,
    last and 64 evenly spaced 64 KB blocks, so checking it costs a few MB whatever the size;
    small files are sampled whole."""
    size = path.stat().st_size
    sampled, whole = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        if full:
            while block := f.read(1 << 22):
                whole.update(block)
        step = max(SAMPLE_BLOCK, (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS + 1))
        for offset in sorted({*range(0, max(size - SAMPLE_BLOCK, 0) + 1, step), max(size - SAMPLE_BLOCK, 0)}):
            f.seek(offset)
            sampled.update(f.read(SAMPLE_BLOCK))
    digest = {"bytes": size, "sampled_sha256": sampled.hexdigest()}
    if full:
        digest["sha256"] = whole.hexdigest()
    return digest


def _is_digest(value: object) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("bytes"), int) and not isinstance(value["bytes"], bool)
            and all(isinstance(value.get(k), str) for k in ("sampled_sha256", "sha256")))


class IndexDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def read_manifest(self) -> dict:
        if not self.path.exists():
            raise ConfigError(f"no index at {self.path}: build one with `imgindex index EMB_DIR --out {self.path}`"
                              " or pass --index")
        if not self.exists():
            raise ConfigError(f"{self.path} is not an index directory (no {MANIFEST}): pass the folder "
                              "`imgindex index --out` wrote")
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except ValueError as exc:
            raise ConfigError(f"{self.path / MANIFEST} is not valid JSON ({exc}): rebuild the index") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ConfigError(f"{self.path / MANIFEST} is not an imgindex index manifest: rebuild the index")
        for key, kind in REQUIRED.items():
            if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
                raise ConfigError(f"{self.path / MANIFEST} is damaged ({key!r} is missing or not a "
                                  f"{kind.__name__}): rebuild the index")
        if not isinstance((manifest["embeddings"].get("model") or {}).get("name"), str) or not all(
                isinstance(p, dict) and isinstance(p.get("shard"), str) for p in manifest["parts"]):
            raise ConfigError(f"{self.path / MANIFEST} is damaged (its model or parts): rebuild the index")
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(_is_digest(files.get(name)) for name in (INDEX, IDS)):
            raise ConfigError(f"{self.path / MANIFEST} is damaged (the digests of {INDEX} and {IDS} are missing "
                              "or malformed), so the index cannot be checked: rebuild the index")
        return manifest

    def verify(self, manifest: dict, full: bool = False) -> None:
        """Check the index's files against the digests its manifest records (read_manifest made sure
        it records them): every byte of files up to FULL_CHECK_BYTES, or of all with `full`; larger
        ones by size and a sampled digest (a few MB read whatever the size)."""
        for name in (INDEX, IDS):
            recorded = manifest["files"][name]
            path = self.path / name
            if not path.is_file():
                raise ConfigError(f"{path} is missing: rebuild the index")
            whole = full or path.stat().st_size <= FULL_CHECK_BYTES
            found = file_digest(path, full=whole)
            keys = ("bytes", "sha256") if whole else ("bytes", "sampled_sha256")
            if any(found[k] != recorded.get(k) for k in keys):
                what = "size" if found["bytes"] != recorded.get("bytes") else "content"
                raise ConfigError(f"{path} is corrupt or truncated: it does not match the digest in its manifest "
                                  f"({what} changed): rebuild the index")

    def record_files(self, manifest: dict) -> None:
        """Digests of the index's data files, into the manifest (before it is written)."""
        manifest["files"] = {name: file_digest(self.path / name, full=True) for name in (INDEX, IDS)}

    def load_index(self, manifest: dict, mmap: bool = True) -> faiss.Index:
        """Read the index (memory-mapped where the type allows) and check it against the manifest."""
        path = self.path / INDEX
        if not path.is_file():
            raise ConfigError(f"{path} is missing: rebuild the index")
        self.verify(manifest)
        flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise ConfigError(f"{path} is corrupt or truncated ({faiss_reason(exc)}): rebuild the index") from None
        if index.ntotal != manifest["count"] or index.d != manifest["dim"]:
            raise ConfigError(f"{path} holds {index.ntotal} vectors of dim {index.d}, the manifest says "
                              f"{manifest['count']} of dim {manifest['dim']} (interrupted update?): rebuild the index")
        return index

    def read_ids(self, manifest: dict) -> pa.Table:
        path = self.path / IDS
        try:
            ids = pq.read_table(path, schema=IDS_SCHEMA)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError(f"{path} is missing or unreadable ({exc}): rebuild the index") from None
        if ids.num_rows != manifest["count"]:
            raise ConfigError(f"{path} has {ids.num_rows} rows for {manifest['count']} vectors: rebuild the index")
        return ids

    def tmp(self, name: str) -> Path:
        return self.path / f".{name}.tmp"

    def forget(self) -> None:
        (self.path / MANIFEST).unlink(missing_ok=True)

    def write_data(self, index: faiss.Index, ids_tmp: Path) -> None:
        """Write the index and move the ids into place; call write_manifest after."""
        faiss.write_index(index, str(self.tmp(INDEX)))
        os.replace(self.tmp(INDEX), self.path / INDEX)
        os.replace(ids_tmp, self.path / IDS)

    def write_manifest(self, manifest: dict) -> None:
        """Written last: a directory with a manifest is complete."""
        self.tmp(MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(self.tmp(MANIFEST), self.path / MANIFEST)
