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
import tempfile
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
RECALL_SET = "recall.npz"  # the build's evaluation queries and their exact neighbours over every vector
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


class Segment(msgspec.Struct, kw_only=True):
    """The rows one --add appended: how many, and its files (segment_files: ids, keys and, for
    lists on disk, its inverted lists)."""

    rows: Annotated[int, msgspec.Meta(ge=0)]
    files: dict[str, str]


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
    segments: list[Segment] = []  # each --add's rows, after the build's
    index_file: str | None = None  # the faiss index when an --add of an index in RAM wrote a new one (else INDEX)
    recall_set: str | None = None  # the recall queries and their exact neighbours (RECALL_SET, or an --add's)
    recall_covers: str | None = None  # what recall_at_10 measures
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


def segment_files(number: int, lists: bool) -> dict[str, str]:
    """The files of the n-th segment an --add appends: its rows' ids, their sorted keys and, for
    lists on disk, its inverted lists (`lists.N.ilod`, offsets, small; `lists.N.ivfdata`, codes)."""
    files = {"ids": f"ids.{number}.arrow", "keys": f"keys.{number}.arrow"}
    if lists:
        files.update(lists=f"lists.{number}.ilod", ivfdata=f"lists.{number}.ivfdata")
    return files


def index_file(manifest: IndexManifest) -> str:
    """The file holding the faiss index (an --add of an index in RAM writes a new one)."""
    return manifest.index_file or INDEX


def data_files(manifest: IndexManifest) -> tuple[str, ...]:
    """The files an index manifest holds digests of (indexes built before the mapped ids have two)."""
    return ((index_file(manifest), IDS) + ((IVFDATA,) if manifest.on_disk else ())
            + ((IDS_MAPPED, KEYS) if manifest.mapped_ids else ())
            + ((manifest.recall_set,) if manifest.recall_set else ())
            + tuple(name for segment in manifest.segments for name in segment.files.values()))


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


def sorted_keys(ids: pa.Table, start: int) -> pa.Table:
    """(key, shard, row) of ids whose first row is index row `start`, sorted by key then shard."""
    order = pc.sort_indices(ids, [("key", "ascending"), ("shard", "ascending")])
    return pa.table({"key": ids["key"].take(order), "shard": ids["shard"].take(order),
                     "row": pc.add(order.cast(pa.int64()), start)}, schema=KEYS_SCHEMA)


KEYS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("row", pa.int64())])
MERGE_BLOCK = 1 << 16  # rows read from each sorted run at a time while they are merged (and its row groups)
MERGE_ROWS = 1 << 22  # rows held from all runs together at most: the block shrinks when there are many runs


def merge_sorted_keys(runs: list, path: str | os.PathLike, block: int | None = None) -> int:
    """Runs of (key, shard, row), each sorted by key then shard (iterables of record batches), merged
    into one sorted Arrow IPC file at `path`, holding at most `block` rows of each run at once (the
    memory does not grow with the rows). Each round takes from every run the rows up to the least
    of the runs' current last keys, sorts only those (Arrow) and writes them. Returns the rows."""
    block = block or max(1, min(MERGE_BLOCK, MERGE_ROWS // max(1, len(runs))))
    sort = [("key", "ascending"), ("shard", "ascending")]
    streams = [_rebatched(iter(run), block) for run in runs]
    held = [next(stream, None) for stream in streams]
    written = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, KEYS_SCHEMA) as writer:
        while any(t is not None for t in held):
            live = [i for i, t in enumerate(held) if t is not None]
            key, shard = min((held[i]["key"][-1].as_py(), held[i]["shard"][-1].as_py()) for i in live)
            taken = []
            for i in live:
                table = held[i]
                upto = pc.or_(pc.less(table["key"], key),
                              pc.and_(pc.equal(table["key"], key), pc.less_equal(table["shard"], shard)))
                count = pc.sum(upto).as_py() or 0  # a prefix: the run is sorted
                taken.append(table.slice(0, count))
                rest = table.slice(count)
                held[i] = rest if rest.num_rows else next(streams[i], None)
            merged = pa.concat_tables(taken)
            merged = merged.take(pc.sort_indices(merged, sort)).combine_chunks()
            writer.write_table(merged)
            written += merged.num_rows
    return written


def _rebatched(batches, block: int):
    """Record batches -> tables of up to `block` rows (the run's order kept)."""
    for batch in batches:
        for start in range(0, batch.num_rows, block):
            piece = batch.slice(start, block)
            if piece.num_rows:
                yield pa.Table.from_batches([piece]).cast(KEYS_SCHEMA)


def write_lists(invlists: faiss.InvertedLists, path: Path) -> None:
    """On-disk inverted lists' header (their offsets and their .ivfdata file's name) into `path`;
    IndexDir.load_index reads it back, the .ivfdata found beside it."""
    writer = faiss.FileIOWriter(str(path))
    faiss.write_InvertedLists(faiss.downcast_InvertedLists(invlists), writer)
    del writer  # closes the file


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

    def publish(self, names: tuple[str, ...] | None = None) -> None:
        """Upload the local copy's data files (each in one piece; only `names` when given: the files
        an --add wrote); call write_manifest after."""
        if not self.remote:
            return
        for name in names if names is not None else (INDEX, IDS, IVFDATA, IDS_MAPPED, KEYS, RECALL_SET):
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

    def record_files(self, manifest: IndexManifest, changed: tuple[str, ...] | None = None) -> None:
        """Digests of the index's data files, into the manifest (before it is written): of every one,
        or only of the `changed` ones (an --add: the digests of the files it left alone are kept)."""
        kept = {} if changed is None else {name: digest for name, digest in (manifest.files if isinstance(manifest.files, dict) else {}).items()
                                           if name not in changed}
        manifest.files = {name: kept[name] if name in kept else file_digest(self.path / name, full=True)
                             for name in data_files(manifest)}

    def load_index(self, manifest: IndexManifest, mmap: bool = True) -> faiss.Index:
        """Read the index (memory-mapped where the type allows) and check it against the manifest."""
        self.fetch(manifest)
        path = self.path / index_file(manifest)
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
        lists = [segment.files["lists"] for segment in manifest.segments if "lists" in segment.files]
        if lists:
            index = self._stack_lists(index, lists, mmap)
        if index.ntotal != manifest.count or index.d != manifest.dim:
            raise Corrupt(f"{path} holds {index.ntotal} vectors of dim {index.d}, the manifest says "
                              f"{manifest.count} of dim {manifest.dim} (interrupted update?): rebuild the index")
        return index

    def _stack_lists(self, index: faiss.Index, names: list[str], mmap: bool) -> faiss.Index:
        """The index serving its own on-disk lists and every segment's, stacked (faiss
        HStackInvertedLists: list i is the concatenation of each one's list i; read only). The
        lists stay mapped for the life of the process: faiss's Python wrapper cannot free
        OnDiskInvertedLists (taking ownership of one breaks its type table), and the stack owns none."""
        ivf = faiss.extract_index_ivf(index)
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_READ_ONLY if mmap else 0)
        lists = [ivf.invlists]
        for name in names:
            try:
                with c_stdout_to_stderr():  # faiss says where it found the segment's .ivfdata, on stdout
                    lists.append(faiss.read_InvertedLists(faiss.FileIOReader(str(self.path / name)), flags))
            except RuntimeError as exc:
                raise Corrupt(f"{self.path / name} is corrupt or truncated ({faiss_reason(exc)}): rebuild the "
                              "index") from None
        pointers = faiss.InvertedListsPtrVector()
        for one in lists:
            pointers.push_back(one)
        stacked = faiss.HStackInvertedLists(pointers.size(), pointers.data())
        stacked.this.disown()  # the index owns the stack
        ivf.own_invlists = False  # the index's own lists are one of the stacked, not freed with it
        ivf.replace_invlists(stacked, True)
        ivf.ntotal = index.ntotal = stacked.compute_ntotal()
        return index

    def read_ids(self, manifest: IndexManifest) -> pa.Table:
        """Row i -> (shard, key): memory-mapped from ids.arrow and every --add's segment after it (RAM
        holds the pages a search touches), or read from ids.parquet for indexes built before it."""
        self.fetch(manifest)
        path = self.path / (IDS_MAPPED if manifest.mapped_ids else IDS)
        names = [segment.files["ids"] for segment in manifest.segments]
        try:
            ids = _mapped(path) if manifest.mapped_ids else pq.read_table(path, schema=IDS_SCHEMA)
            if names:
                path = self.path  # named in the message should a segment be unreadable
                ids = pa.concat_tables([ids, *(_mapped(self.path / name) for name in names)])  # zero copy
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError(f"{path} is missing or unreadable ({exc}): rebuild the index") from None
        if ids.num_rows != manifest.count:
            raise Corrupt(f"{path} has {ids.num_rows} rows for {manifest.count} vectors: rebuild the index")
        return ids

    def read_keys(self, manifest: IndexManifest) -> list[pa.Table] | None:
        """The sorted key tables (memory-mapped): the build's and one per --add segment, each sorted
        on its own; None for indexes built before them."""
        if not manifest.mapped_ids:
            return None
        tables = []
        for name in (KEYS, *(segment.files["keys"] for segment in manifest.segments)):
            try:
                tables.append(_mapped(self.path / name))
            except (OSError, pa.ArrowInvalid) as exc:
                raise ConfigError(f"{self.path / name} is missing or unreadable ({exc}): rebuild the index") from None
        return tables

    def place_lookups(self) -> None:
        """ids.arrow and keys.arrow, written at their temporary names, into place (after write_data,
        before record_files)."""
        os.replace(self.tmp(IDS_MAPPED), self.path / IDS_MAPPED)
        os.replace(self.tmp(KEYS), self.path / KEYS)

    def write_recall_set(self, name: str, **arrays: np.ndarray) -> None:
        """The evaluation queries (ids, vectors) and their exact neighbours (scores, exact) over every
        vector of the index: an --add brings them up to date from the new vectors alone (into a
        file of a new name, so the index stays whole until its new manifest is written)."""
        with open(self.tmp(name), "wb") as f:
            np.savez(f, **arrays)
        os.replace(self.tmp(name), self.path / name)

    def read_recall_set(self, manifest: IndexManifest) -> dict[str, np.ndarray] | None:
        """The recall set the manifest records (checked against its digest when the index loaded), or None."""
        if not manifest.recall_set:
            return None
        try:
            with np.load(self.path / manifest.recall_set) as found:
                return {k: found[k] for k in found.files}
        except (OSError, ValueError) as exc:
            raise Corrupt(f"{self.path / manifest.recall_set} is missing or unreadable ({exc}): "
                          "rebuild the index") from None

    def tmp(self, name: str) -> Path:
        return self.path / f".{name}.tmp"

    def remove(self, names: list[str]) -> None:
        """Files no manifest names any longer (an --add's replaced index file and recall set)."""
        for name in names:
            (self.path / name).unlink(missing_ok=True)
            if self.remote and self.fs.exists(self._remote(name)):
                self.fs.rm_file(self._remote(name))

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

    def write_manifest(self, manifest: IndexManifest, changed: tuple[str, ...] | None = None) -> None:
        """Written last: a directory with a manifest is complete (a remote one: after its files are
        uploaded: all, or only the `changed` ones)."""
        self.tmp(MANIFEST).write_bytes(manifest.to_json())
        os.replace(self.tmp(MANIFEST), self.path / MANIFEST)
        if self.remote:
            self.publish(changed)
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
        else:  # spooled to a local file, then one upload: never a copy of the file in memory
            with tempfile.TemporaryDirectory(prefix="imgindex-put-") as spool:
                tmp = os.path.join(spool, "file")
                with open(tmp, "wb") as f:
                    write(f)
                self.fs.put_file(tmp, path)

    def write_index(self, name: str, index: faiss.Index) -> None:
        """Streamed to the file a block at a time: a sub-index is never copied in memory (the
        serialized bytes were two more copies of it, tripling a worker's peak)."""
        self._put(name, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))

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
        with self.fs.open(self.path(name), "rb") as f:  # read a block at a time, not whole into memory first
            return faiss.read_index(faiss.PyCallbackIOReader(f.read), flags)

    def write_table(self, name: str, table: pa.Table, row_group_size: int | None = None) -> None:
        self._put(name, lambda f: pq.write_table(table, f, compression="zstd", row_group_size=row_group_size))

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
