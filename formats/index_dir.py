"""The index directory: index.faiss, ids.parquet (row i -> shard, key) and manifest.json.

Loading checks that the three agree, and turns every way a directory can be wrong
(missing, not an index, truncated or corrupt file, interrupted update) into one clear line.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import faiss
import fsspec
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgindex.errors import ConfigError, Corrupt
from imgindex.formats.records import EmbeddingsManifest, decode, encode

INDEX = "index.faiss"
IDS = "ids.parquet"
IVFDATA = "index.ivfdata"  # an IVF index's inverted lists, when they are kept on disk
IDS_MAPPED = "ids.arrow"  # ids.parquet as an uncompressed Arrow IPC file: memory-mapped by searches
KEYS = "keys.arrow"  # (key, shard, row) sorted by key then shard: a key is found by binary search
MANIFEST = "manifest.json"
BUILD = "_build"  # a build in progress: its plan, trained index and finished tasks (removed once built)
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


class PartRecord(msgspec.Struct, kw_only=True):
    """An index manifest's record of one part it holds: its shard and rows (contiguous in the index,
    in the manifest's order), the embeddings directory that holds it and its digest."""

    shard: str
    rows: Annotated[int, msgspec.Meta(ge=0)]
    dir: str
    file: dict[str, Any] | None = None  # part_digest's; None from builds before remote parts had one


class IndexManifest(msgspec.Struct, kw_only=True):
    """IDX/manifest.json, written last: what the index holds (its embeddings, parts, count), how it
    was built and searched (factory, recall, search knob), and its data files' digests. Unknown
    fields are ignored and later ones have defaults, so indexes built before read."""

    format: str = FORMAT
    embeddings_dir: str
    embeddings: EmbeddingsManifest
    factory: str
    selection: str | None = None
    notes: list[str] = []
    on_disk: bool = False  # an IVF index's lists in index.ivfdata
    mapped_ids: bool = False  # ids.arrow and keys.arrow (indexes built before have ids.parquet only)
    metric: str = "inner_product"
    normalized: bool = True
    count: Annotated[int, msgspec.Meta(ge=0)]
    dim: Annotated[int, msgspec.Meta(ge=1)]
    build: dict[str, Any] = {}
    parts: list[PartRecord]
    recall_at_10: float | None = None
    recall_queries: int | None = None
    search_params: dict[str, Any] = {}
    recall_curve: list[dict[str, Any]] = []
    train_residual: float | None = None
    faiss_gpus: int | None = None
    versions: dict[str, Any] = {}
    created: str | None = None
    adds: list[dict[str, Any]] = []
    timings: dict[str, Any] = {}
    # data file -> its file_digest; read_manifest checks there is one for each data file (a damaged one
    # is refused as missing digests, whatever its type)
    files: Any = {}

    def to_json(self) -> bytes:
        return encode(self)

    @classmethod
    def from_json(cls, data: bytes | str, where: str) -> IndexManifest:
        manifest = decode(cls, data, where, "rebuild the index")
        if manifest.format != FORMAT:
            raise ConfigError(f"{where} is not an imgindex index manifest: rebuild the index")
        return manifest


SAMPLE_BLOCK = 64 * 1024
SAMPLE_BLOCKS = 64  # besides the first and last blocks; files up to 66 blocks are read whole
# Files up to this size are hashed whole when an index loads (well under a second); larger ones are
# checked by size and the sampled digest, which misses changes that fall between its blocks.
FULL_CHECK_BYTES = 256 * 2**20


def file_digest(path: Path, full: bool = True) -> dict:
    """{"bytes", "sampled_sha256"} (and "sha256" with `full`). The sampled digest reads the first,
    last and 64 evenly spaced 64 KB blocks, so checking it costs a few MB whatever the size;
    small files are sampled whole."""
    with open(path, "rb") as f:
        return _digest(f, path.stat().st_size, full)


def part_digest(fs, path: str, local: bool) -> dict:
    """What an index records of an embeddings part to notice it changed: size and sampled sha256
    for local files; for objects, size and the store's ETag or checksum when it gives one (no
    read at all), else the sampled sha256 by ranged reads."""
    if local:
        return file_digest(Path(path), full=False)
    info = fs.info(path)
    tag = next((info[k] for k in ("ETag", "etag", "checksum", "md5Hash", "crc32c") if info.get(k)), None)
    if tag:
        return {"bytes": int(info["size"]), "etag": str(tag).strip('"')}
    with fs.open(path, "rb", block_size=SAMPLE_BLOCK) as f:
        return _digest(f, int(info["size"]), full=False)


def digest_changes(recorded: dict, found: dict) -> list[str]:
    """The digest fields two digests both have and disagree on (empty: the same file, as far as known)."""
    return [k for k in ("bytes", "sha256", "sampled_sha256", "etag") if k in recorded and k in found
            and recorded[k] != found[k]]


def _digest(f, size: int, full: bool) -> dict:
    """The digest of an open file (local, or an fsspec object read by ranges)."""
    sampled, whole = hashlib.sha256(), hashlib.sha256()
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


def data_files(manifest: IndexManifest) -> tuple[str, ...]:
    """The files an index manifest holds digests of (indexes built before the mapped ids have two)."""
    return ((INDEX, IDS) + ((IVFDATA,) if manifest.on_disk else ())
            + ((IDS_MAPPED, KEYS) if manifest.mapped_ids else ()))


def _is_digest(value: object) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("bytes"), int) and not isinstance(value["bytes"], bool)
            and all(isinstance(value.get(k), str) for k in ("sampled_sha256", "sha256")))


@contextlib.contextmanager
def c_stdout_to_stderr():
    """C++ code's printf output goes to stderr meanwhile, so the command's stdout stays its own."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)  # what C buffered goes out now, to stderr
        os.dup2(saved, 1)
        os.close(saved)


def _mapped(path: Path) -> pa.Table:
    """An Arrow IPC file as a table whose buffers are the file's pages (zero copy)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _write_ipc(table: pa.Table, path: Path, batch_rows: int = 1 << 20) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch_rows)


def is_remote(url: str) -> bool:
    """An fsspec URL other than a local file (s3://, gs://, ...)."""
    return "://" in url and not url.startswith("file://")


def cache_dir(url: str) -> Path:
    """The local copy of a remote index (written there, then uploaded; downloaded there to be mapped)."""
    root = Path(os.environ.get("IMGINDEX_CACHE") or Path.home() / ".cache" / "imgindex") / "indexes"
    return root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]


class IndexDir:
    """An index directory at a local path or any fsspec URL. A remote one is written in a local
    staging copy (`path`) and uploaded file by file, each whole, the manifest last; it is read
    through the same local copy, where each file is downloaded only when its digest differs."""

    def __init__(self, path: str | os.PathLike):
        self.url = str(path).rstrip("/") or str(path)
        self.remote = is_remote(self.url)
        if self.remote:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            self.path = cache_dir(self.url)
        else:
            self.fs, self.root = None, None
            self.path = Path(self.url.removeprefix("file://"))

    def _remote(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def exists(self) -> bool:
        if self.remote:
            return self.fs.exists(self._remote(MANIFEST))
        return (self.path / MANIFEST).is_file()

    def _manifest_text(self) -> str:
        if self.remote:
            if not self.fs.exists(self.root) and not self.exists():
                raise ConfigError(f"no index at {self.url}: build one with `imgindex index EMB_DIR --out {self.url}`"
                                  " or pass --index")
            if not self.exists():
                raise ConfigError(f"{self.url} is not an index directory (no {MANIFEST}): pass the folder "
                                  "`imgindex index --out` wrote")
            return self.fs.cat_file(self._remote(MANIFEST)).decode()
        if not self.path.exists():
            raise ConfigError(f"no index at {self.path}: build one with `imgindex index EMB_DIR --out {self.path}`"
                              " or pass --index")
        if not self.exists():
            raise ConfigError(f"{self.path} is not an index directory (no {MANIFEST}): pass the folder "
                              "`imgindex index --out` wrote")
        return (self.path / MANIFEST).read_text()

    def fetch(self, manifest: IndexManifest, again: bool = False) -> None:
        """A remote index's data files into the local copy, each only when missing or different there
        (`again`: every one, as --verify checks what the store holds)."""
        if not self.remote:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for name in data_files(manifest):
            local, recorded = self.path / name, manifest.files.get(name) or {}
            if not again and local.is_file() and local.stat().st_size == recorded.get("bytes") and \
                    file_digest(local, full=False)["sampled_sha256"] == recorded.get("sampled_sha256"):
                continue
            tmp = self.path / f".{name}.download"
            try:
                self.fs.get_file(self._remote(name), str(tmp))
            except (OSError, FileNotFoundError) as exc:
                raise ConfigError(f"{self.url}/{name} cannot be read ({exc}): rebuild the index") from None
            os.replace(tmp, local)

    def publish(self) -> None:
        """Upload the local copy's data files (each in one piece); call write_manifest after."""
        if not self.remote:
            return
        for name in (INDEX, IDS, IVFDATA, IDS_MAPPED, KEYS):
            if (self.path / name).is_file():
                self.fs.put_file(str(self.path / name), self._remote(name))
            elif self.fs.exists(self._remote(name)):
                self.fs.rm_file(self._remote(name))

    def read_manifest(self) -> IndexManifest:
        """The manifest, every field checked; a damaged one is Corrupt."""
        manifest = IndexManifest.from_json(self._manifest_text(), str(self.path / MANIFEST))
        files = manifest.files if isinstance(manifest.files, dict) else {}
        if not all(_is_digest(files.get(name)) for name in data_files(manifest)):
            raise Corrupt(f"{self.path / MANIFEST} is damaged (the digests of "
                          f"{' and '.join(data_files(manifest))} are missing or malformed), so the index cannot "
                          "be checked: rebuild the index")
        return manifest

    def verify(self, manifest: IndexManifest, full: bool = False) -> None:
        """Check the index's files against the digests its manifest records (read_manifest made sure
        it records them): every byte of files up to FULL_CHECK_BYTES, or of all with `full`; larger
        ones by size and a sampled digest (a few MB read whatever the size)."""
        self.fetch(manifest, again=full)
        for name in data_files(manifest):
            recorded = manifest.files[name]
            path = self.path / name
            if not path.is_file():
                raise ConfigError(f"{path} is missing: rebuild the index")
            whole = full or path.stat().st_size <= FULL_CHECK_BYTES
            found = file_digest(path, full=whole)
            keys = ("bytes", "sha256") if whole else ("bytes", "sampled_sha256")
            if any(found[k] != recorded.get(k) for k in keys):
                what = "size" if found["bytes"] != recorded.get("bytes") else "content"
                raise Corrupt(f"{path} is corrupt or truncated: it does not match the digest in its manifest "
                                  f"({what} changed): rebuild the index")

    def record_files(self, manifest: IndexManifest) -> None:
        """Digests of the index's data files, into the manifest (before it is written)."""
        manifest.files = {name: file_digest(self.path / name, full=True) for name in data_files(manifest)}

    def load_index(self, manifest: IndexManifest, mmap: bool = True) -> faiss.Index:
        """Read the index (memory-mapped where the type allows) and check it against the manifest."""
        self.fetch(manifest)
        path = self.path / INDEX
        if not path.is_file():
            raise ConfigError(f"{path} is missing: rebuild the index")
        self.verify(manifest)
        flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        if manifest.on_disk:  # the lists are memory-mapped from index.ivfdata beside it, whatever `mmap`
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_READ_ONLY if mmap else 0)
        try:
            with c_stdout_to_stderr():  # faiss says where it found index.ivfdata, on stdout
                index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise Corrupt(f"{path} is corrupt or truncated ({faiss_reason(exc)}): rebuild the index") from None
        if index.ntotal != manifest.count or index.d != manifest.dim:
            raise Corrupt(f"{path} holds {index.ntotal} vectors of dim {index.d}, the manifest says "
                              f"{manifest.count} of dim {manifest.dim} (interrupted update?): rebuild the index")
        return index

    def read_ids(self, manifest: IndexManifest) -> pa.Table:
        """Row i -> (shard, key): memory-mapped from ids.arrow (RAM holds the pages a search touches),
        or read from ids.parquet for indexes built before it."""
        self.fetch(manifest)
        path = self.path / (IDS_MAPPED if manifest.mapped_ids else IDS)
        try:
            ids = _mapped(path) if manifest.mapped_ids else pq.read_table(path, schema=IDS_SCHEMA)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError(f"{path} is missing or unreadable ({exc}): rebuild the index") from None
        if ids.num_rows != manifest.count:
            raise Corrupt(f"{path} has {ids.num_rows} rows for {manifest.count} vectors: rebuild the index")
        return ids

    def read_keys(self, manifest: IndexManifest) -> pa.Table | None:
        """The sorted key table (memory-mapped), or None for indexes built before it."""
        if not manifest.mapped_ids:
            return None
        try:
            return _mapped(self.path / KEYS)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError(f"{self.path / KEYS} is missing or unreadable ({exc}): rebuild the index") from None

    def write_lookups(self) -> None:
        """ids.arrow and keys.arrow from ids.parquet (call after write_data, before record_files)."""
        ids = pq.read_table(self.path / IDS, schema=IDS_SCHEMA)
        _write_ipc(ids, self.tmp(IDS_MAPPED))
        order = pc.sort_indices(ids, [("key", "ascending"), ("shard", "ascending")])
        keys = pa.table({"key": ids["key"].take(order), "shard": ids["shard"].take(order),
                         "row": order.cast(pa.int64())})
        del ids
        _write_ipc(keys, self.tmp(KEYS))
        os.replace(self.tmp(IDS_MAPPED), self.path / IDS_MAPPED)
        os.replace(self.tmp(KEYS), self.path / KEYS)

    def tmp(self, name: str) -> Path:
        return self.path / f".{name}.tmp"

    def forget(self) -> None:
        if self.remote and self.fs.exists(self._remote(MANIFEST)):
            self.fs.rm_file(self._remote(MANIFEST))
        (self.path / MANIFEST).unlink(missing_ok=True)

    def write_data(self, index: faiss.Index, ids_tmp: Path, ivfdata_tmp: Path | None = None,
                   on_disk: bool = False) -> None:
        """Write the index and move the ids (and new on-disk lists) into place; call write_manifest after.
        `on_disk`: the index's lists are in index.ivfdata (kept), else a stale one is removed."""
        faiss.write_index(index, str(self.tmp(INDEX)))
        os.replace(self.tmp(INDEX), self.path / INDEX)
        os.replace(ids_tmp, self.path / IDS)
        if ivfdata_tmp is not None:
            os.replace(ivfdata_tmp, self.path / IVFDATA)
        elif not on_disk and (self.path / IVFDATA).exists():  # rebuilt in RAM over an index that was on disk
            (self.path / IVFDATA).unlink()

    @property
    def build_url(self) -> str:
        """Where a build in progress keeps its files (BuildDir): beside the index, where workers reach it."""
        return f"{self.url}/{BUILD}" if self.remote else str(self.path / BUILD)

    def write_manifest(self, manifest: IndexManifest) -> None:
        """Written last: a directory with a manifest is complete (a remote one: after its files are uploaded)."""
        self.tmp(MANIFEST).write_bytes(manifest.to_json())
        os.replace(self.tmp(MANIFEST), self.path / MANIFEST)
        if self.remote:
            self.publish()
            self.fs.put_file(str(self.path / MANIFEST), self._remote(MANIFEST))


class BuildDir:
    """IDX/_build, on a local path or any fsspec URL that every worker reaches: the files a build
    in progress shares between its driver and its workers. Each file appears whole or not at all
    (a temporary name renamed into place locally; one PUT on object stores)."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def clear(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def _put(self, name: str, write) -> None:
        """`write(file object)` produces the file; it becomes visible only once complete."""
        path = self.path(name)
        if self.local:
            tmp = posixpath.join(self.root, f".{name}.{uuid.uuid4().hex}.tmp")  # a retried task may race its first try
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            buffer = io.BytesIO()
            write(buffer)
            self.fs.pipe_file(path, buffer.getvalue())

    def write_index(self, name: str, index: faiss.Index) -> None:
        self._put(name, lambda f: f.write(faiss.serialize_index(index).tobytes()))

    def local_file(self, name: str, where: Path) -> str:
        """A local path of the file: itself, or a copy downloaded into `where`."""
        if self.local:
            return self.path(name)
        where.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self.path(name), str(where / name))
        return str(where / name)

    def read_index(self, name: str, flags: int = 0) -> faiss.Index:
        if self.local:
            return faiss.read_index(self.path(name), flags)
        return faiss.deserialize_index(np.frombuffer(self.fs.cat_file(self.path(name)), dtype=np.uint8))

    def write_table(self, name: str, table: pa.Table) -> None:
        self._put(name, lambda f: pq.write_table(table, f, compression="zstd"))

    def read_table(self, name: str) -> pa.Table:
        return pq.read_table(self.path(name), filesystem=self.fs)

    def write_arrays(self, name: str, **arrays: np.ndarray) -> None:
        self._put(name, lambda f: np.savez(f, **arrays))

    def read_arrays(self, name: str) -> dict[str, np.ndarray]:
        with self.fs.open(self.path(name), "rb") as f:
            with np.load(io.BytesIO(f.read())) as found:
                return {k: found[k] for k in found.files}

    def write_json(self, name: str, value: dict) -> None:
        self._put(name, lambda f: f.write(json.dumps(value, indent=2, sort_keys=True).encode()))

    def read_json(self, name: str) -> dict | None:
        """The JSON file, or None when it is missing or unreadable (a crashed run's leftovers)."""
        try:
            with self.fs.open(self.path(name), "rb") as f:
                value = json.loads(f.read())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None
