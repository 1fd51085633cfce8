"""Sources -> a sorted plan of Shards, and a Shard -> its samples (raw bytes, not decoded).

A source is a WebDataset tar (path, glob, brace pattern or fsspec URL), an image folder
(searched recursively, extensions in any case) or a file list (.txt, one path a line, or
.parquet with a path column). Folders and lists are cut into shards of
`folder_shard_size` images so that one shard stays one unit of work.
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
import signal
import tarfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow.parquet as pq

from imgindex.errors import ConfigError
from imgindex.pipeline.config import SourceConfig

IMAGE_EXTENSIONS = frozenset(
    "jpg jpeg jpe jfif png webp bmp gif tif tiff ppm pgm pbm pnm ico".split()
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIXES = (".txt", ".lst", ".parquet")
CAPTION_EXTENSIONS = ("txt", "caption")


ShardKind = Literal["tar", "folder", "list"]


@dataclass(frozen=True)
class Shard:
    """One unit of work: its name is unique in a plan and names the output part."""

    name: str
    kind: ShardKind
    url: str  # the tar, the folder root or the list file
    files: tuple[str, ...] = ()  # folder and list: full URLs of the images
    keys: tuple[str, ...] = ()  # folder and list: the sample key of each image
    captions: tuple[str | None, ...] = ()
    urls: tuple[str | None, ...] = ()


@dataclass
class Sample:
    """One sample of a shard: the image bytes and passthrough sidecars, or why it has none."""

    key: str
    member: str = ""
    data: bytes | None = None
    error: tuple[str, str] | None = None  # (error class, message) when there is no image
    caption: str | None = None
    json: str | None = None
    url: str | None = None
    key_bytes: bytes | None = None  # the name's original bytes, when they are not UTF-8 (see text_key)
    skipped: str | None = None  # a tar member that is no sample (a directory, a link...): counted, not embedded
    offset: int | None = None  # where the image's bytes start in an uncompressed tar (read back by range)


def _is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "shard"


def _stem(path: str) -> str:
    base = PurePosixPath(path.rstrip("/")).name
    for suffix in TAR_SUFFIXES + LIST_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _expand(source: str) -> list[tuple[fsspec.AbstractFileSystem, str]]:
    """Brace patterns and globs -> existing paths, each with its filesystem."""
    found = []
    for pattern in braceexpand.braceexpand(source):
        fs, path = fsspec.core.url_to_fs(pattern)
        if isinstance(fs, LocalFileSystem):  # shown and recorded as a plain path: /a/b/../c is /a/c
            path = os.path.normpath(path)
        if any(ch in path for ch in "*?["):
            matches = sorted(fs.glob(path))
            if not matches:
                raise ConfigError(f"source {pattern!r} matches no files: check the pattern")
            found.extend((fs, m) for m in matches)
        elif fs.exists(path):
            found.append((fs, path))
        else:
            raise ConfigError(f"source {pattern!r} does not exist: check the path or URL")
    return found


def _chunks(kind: str, name: str, root: str, files: list[str], keys: list[str], size: int,
            captions: list | None = None, urls: list | None = None) -> list[Shard]:
    shards = []
    for start in range(0, len(files), size):
        end = start + size
        shards.append(Shard(
            name=f"{name}-{start // size:05d}", kind=kind, url=root,
            files=tuple(files[start:end]), keys=tuple(keys[start:end]),
            captions=tuple(captions[start:end]) if captions else (),
            urls=tuple(urls[start:end]) if urls else (),
        ))
    return shards


def _folder_shards(fs: fsspec.AbstractFileSystem, root: str, config: SourceConfig) -> list[Shard]:
    found = fs.find(root)
    paths = sorted(p for p in found if _is_image_name(p))
    if not paths:
        if any(p.lower().endswith(TAR_SUFFIXES) for p in found):
            raise ConfigError(f"folder {root!r} holds tar shards, not images: pass them, e.g. '{root}/*.tar'")
        raise ConfigError(
            f"image folder {root!r} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    prefix = root.rstrip("/") + "/"
    keys = [p[len(prefix):] if p.startswith(prefix) else p for p in paths]
    files = [fs.unstrip_protocol(p) for p in paths]
    return _chunks("folder", _safe(_stem(root)), fs.unstrip_protocol(root), files, keys, config.folder_shard_size)


def _list_shards(fs: fsspec.AbstractFileSystem, path: str, config: SourceConfig) -> list[Shard]:
    captions = urls = None
    if path.lower().endswith(".parquet"):
        table = pq.read_table(path, filesystem=fs)
        if config.list_column not in table.column_names:
            raise ConfigError(
                f"file list {path!r} has no column {config.list_column!r} "
                f"(columns: {', '.join(table.column_names)}); set source.list_column"
            )
        entries = [str(v) for v in table.column(config.list_column).to_pylist() if v]
        captions = table.column("caption").to_pylist() if "caption" in table.column_names else None
        urls = table.column("url").to_pylist() if "url" in table.column_names else None
    else:
        with fs.open(path, "rt", encoding="utf-8", errors="surrogateescape") as f:  # names as the list has them
            entries = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not entries:
        raise ConfigError(f"file list {path!r} lists no images")
    list_url = fs.unstrip_protocol(path)
    files = [list_entry_url(list_url, e) for e in entries]
    return _chunks("list", _safe(_stem(path)), list_url, files, entries,
                   config.folder_shard_size, captions, urls)


def list_entry_url(list_url: str, entry: str) -> str:
    """Entries of a file list are URLs, absolute paths, or paths relative to the list's folder."""
    if "://" in entry or entry.startswith("/"):
        return entry
    return f"{list_url.rsplit('/', 1)[0]}/{entry}"


def plan_shards(sources: list[str], config: SourceConfig) -> list[Shard]:
    """Resolve every source into shards, sorted by name, with unique names.

    Raises ConfigError (one line, says what to fix) for a missing or empty source.
    """
    if not sources:
        raise ConfigError("no source given: pass tar shards, image folders or file lists")
    shards: list[Shard] = []
    for source in sources:
        for fs, path in _expand(source):
            lower = path.lower()
            if fs.isdir(path):
                shards.extend(_folder_shards(fs, path, config))
            elif lower.endswith(TAR_SUFFIXES):
                shards.append(Shard(name=_safe(_stem(path)), kind="tar", url=fs.unstrip_protocol(path)))
            elif lower.endswith(LIST_SUFFIXES):
                shards.extend(_list_shards(fs, path, config))
            else:
                raise ConfigError(
                    f"source {path!r} is not a tar shard, image folder or file list "
                    f"(expected a folder or a name ending in {', '.join(TAR_SUFFIXES + LIST_SUFFIXES)})"
                )
    return _dedupe_names(shards)


def _dedupe_names(shards: list[Shard]) -> list[Shard]:
    """Keep names short and stable; two sources with the same stem get a hash of their URL."""
    seen: dict[str, int] = {}
    for shard in shards:
        seen[shard.name] = seen.get(shard.name, 0) + 1
    renamed = []
    for shard in shards:
        if seen[shard.name] > 1:
            digest = hashlib.sha1(f"{shard.url}|{shard.keys[:1]}".encode()).hexdigest()[:8]
            shard = Shard(**{**shard.__dict__, "name": f"{shard.name}-{digest}"})
        renamed.append(shard)
    names = [s.name for s in renamed]
    if len(set(names)) != len(names):
        raise ConfigError("the same source is given twice: each tar, folder or list may appear once")
    return sorted(renamed, key=lambda s: s.name)


# A name that is not its own key: not UTF-8, or holding a backslash that could be read as an escape.
_AMBIGUOUS = re.compile(r"\\(?:\\|x[89a-f][0-9a-f])")
_ESCAPE = re.compile(r"\\(?:(\\)|x([89a-f][0-9a-f]))")


def text_key(name: str) -> tuple[str, bytes | None]:
    """A file or member name as a key, and the name's bytes when the key is not the name itself.

    A UTF-8 name is its own key, unless it holds `\\\\` or `\\xNN` (NN 80-ff) that could be read as an
    escape. Any other name (a Latin-1 name from an old archive, say, which Python decodes with
    surrogate escapes) is escaped: each backslash as `\\\\`, each byte that is not UTF-8 as `\\xNN`.
    So two names never share a key and `raw_name` gives back the exact name; the part keeps the
    bytes in `key_bytes` too."""
    try:
        name.encode("utf-8")
        if not _AMBIGUOUS.search(name):
            return name, None
    except UnicodeEncodeError:
        pass
    raw = name.encode("utf-8", "surrogateescape")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace"), raw


def printable(text: str) -> str:
    """Any string as valid UTF-8 text for JSON and HTML: a name that is not UTF-8 (held with
    surrogate escapes, as Python decodes it) shows its bytes as `\\xNN`, as its key does; any
    other lone surrogate its `\\uXXXX`."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text_key(text)[0]
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def raw_name(key: str) -> str:
    """The name a key came from (text_key undone; bytes that are not UTF-8 as Python's surrogate
    escapes, as os.fsdecode gives them)."""
    if not _AMBIGUOUS.search(key):
        return key
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) else chr(0xDC00 + int(m.group(2), 16)), key)


def _tar_sample(key: str, members: dict[str, tuple[str, bytes | _TooLarge, int | None]]) -> Sample:
    """A webdataset-style group of members (extension -> (member name, bytes, data offset)) -> Sample."""
    text, raw = text_key(key)
    sample = Sample(key=text, key_bytes=raw)
    too_large = [(name, data) for name, data, _ in members.values() if isinstance(data, _TooLarge)]
    if too_large:
        name, data = too_large[0]
        sample.member = text_key(name)[0]
        sample.error = ("too_large", f"member {sample.member!r}: {data.message()}")
        return sample
    for ext in CAPTION_EXTENSIONS:
        if ext in members:
            sample.caption = members[ext][1].decode("utf-8", errors="replace")
            break
    if "json" in members:
        sample.json = members["json"][1].decode("utf-8", errors="replace")
        try:
            meta = json.loads(sample.json)
            url = meta.get("url") if isinstance(meta, dict) else None
            sample.url = url if isinstance(url, str) else None
        except ValueError:
            pass
    images = [ext for ext in members if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    if images:
        sample.member, sample.data, sample.offset = members[images[0]]
    elif len(members) == 1 and "" in members:  # one member whose name has no extension: the bytes decide
        sample.member, sample.data, sample.offset = members[""]
    else:
        sample.member = next(iter(members.values()))[0]
        sample.error = ("no_image", f"no image member for key {text!r} (members: {', '.join(sorted(members))})")
    sample.member = text_key(sample.member)[0]
    return sample


def _member_kind(info: tarfile.TarInfo) -> str | None:
    """Why a tar member is no part of a sample (None: a regular file, which is)."""
    if info.isreg():
        return "webdataset_meta" if re.match(r"__[^/]*__($|/)", info.name) else None
    for kind, test in (("directory", info.isdir), ("symlink", info.issym), ("hardlink", info.islnk),
                       ("fifo", info.isfifo), ("device", lambda: info.ischr() or info.isblk())):
        if test():
            return kind
    return "other_member_type"


def _split_name(name: str) -> tuple[str, str]:
    """Member name -> (key, extension) by webdataset's rule: the key runs to the first dot of the
    base name. A base name outside the rule (hidden, such as `x/.a.jpg`, or with no extension) is a
    sample of its own, keyed by the whole name with no extension, so its bytes decide whether it
    is an image; this holds in sub-folders too (webdataset's own pattern would key `x/.a.jpg` and
    `x/.b.jpg` both `x/`)."""
    name = name.removeprefix("./")
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise TimeoutError (an OSError) in the block after `seconds`: a read stuck on a dead
    mount, a hung server or a FIFO fails instead of hanging the job. It uses SIGALRM, so it
    acts only in a process's main thread (decode worker processes, and the in-process loader
    on a CPU); elsewhere, and with no `seconds`, the block runs unbounded."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"no data after {seconds:g} s (source.read_timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Tracked:
    """A stream read front to back that remembers where its last non-zero byte ended: tarfile
    (with ignore_zeros) skips zero blocks and junk alike, and only the zeros end a tar."""

    def __init__(self, f):
        self.f, self.pos, self.data_end = f, 0, 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        end = len(data.rstrip(b"\0"))
        if end:
            self.data_end = self.pos + end
        self.pos += len(data)
        return data


def _uncompressed(f):
    """A tar's bytes as tar offsets count them: gzip, bzip2 and xz are opened by their magic bytes."""
    head = f.read(6)
    rest = _Prefixed(head, f)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=rest, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(rest)
    if head.startswith(b"\xfd7zXZ"):
        return lzma.LZMAFile(rest)
    return rest


class _Prefixed:
    """Bytes already read, then the rest of the file (for streams that cannot seek back)."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.f.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.f.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data if len(data) == size else data + self.f.read(size - len(data))


def read_tar(shard: Shard, timeout: float | None = None, max_bytes: int | None = None) -> Iterator[Sample]:
    """Samples of a tar shard: consecutive members sharing a key form one sample (webdataset's rule).

    Every member is accounted for: part of a sample, or a `skipped` marker saying why it is
    none (directory, symlink, hardlink, fifo, device, webdataset_meta). A member over `max_bytes`
    is a `too_large` failure, skipped unread. A corrupt header is skipped up to the next valid
    one, as GNU tar does, and recorded as one `bad_shard` failure with its byte offsets; so are
    bytes after the last member that are no tar (a file of random bytes is one such failure). A
    tar that cannot be opened, or stops being readable part-way (or takes over `timeout` seconds
    to open or to give its next member), adds one `bad_shard` sample for the unreadable rest, so
    the loss is recorded rather than silent. Samples of an uncompressed tar carry their image
    member's data offset, so one image can be read back without reading the tar.
    """
    key, members = None, {}
    expected = 0  # where the next header should start
    tracked = None
    try:
        with deadline(timeout):
            opened = fsspec.open(shard.url, "rb").open()
            tracked = _Tracked(_uncompressed(opened))
        with opened, tarfile.open(fileobj=tracked, mode="r|", ignore_zeros=True) as tar:
            compressed = not isinstance(tracked.f, _Prefixed)
            entries = iter(tar)
            while True:
                with deadline(timeout):
                    info = next(entries, None)
                if info is None:
                    break
                if info.offset > expected:
                    yield Sample(key=f"{text_key(key or '')[0]}#bad-header-at-{expected}", member=shard.url,
                                 error=("bad_shard", f"bytes {expected} to {info.offset} of the tar hold no valid "
                                                     f"header: skipped to the next member, {text_key(info.name)[0]!r}"))
                expected = info.offset_data + (-(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                                               if info.isreg() else 0)
                skipped = _member_kind(info)
                if skipped:
                    yield Sample(key=text_key(info.name)[0], member=text_key(info.name)[0], skipped=skipped)
                    continue
                prefix, ext = _split_name(info.name)
                if (prefix != key or ext in members) and members:  # a repeated extension starts a new sample
                    yield _tar_sample(key, members)
                    members = {}
                key = prefix
                if max_bytes is not None and info.size > max_bytes:
                    members[ext] = (info.name, _TooLarge(info.size, max_bytes), None)
                    continue
                with deadline(timeout):
                    data = tar.extractfile(info).read()
                members[ext] = (info.name, data, None if compressed else info.offset_data)
        if tracked.data_end > expected:
            if members:
                yield _tar_sample(key, members)
                members = {}
            yield Sample(key=f"{text_key(key or '')[0]}#bad-tail-at-{expected}", member=shard.url,
                         error=("bad_shard", f"bytes {expected} to {tracked.data_end} of the tar hold no valid "
                                             "header (not a tar, or junk after its last member)"))
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        if members:
            yield _tar_sample(key, members)
            members = {}
        where = f"after key {text_key(key)[0]!r}" if key else "from the start"
        yield Sample(key=f"{text_key(key or '')[0]}#unreadable-rest", member=shard.url,
                     error=("bad_shard", f"tar is unreadable {where}: {type(exc).__name__}: {exc} "
                                         f"(from byte {expected})"))
    if members:
        yield _tar_sample(key, members)


@dataclass(frozen=True)
class _TooLarge:
    """A member left unread: its size is over the limit."""

    size: int
    limit: int

    def message(self) -> str:
        return f"{self.size} bytes is over the limit of {self.limit} (source.max_file_bytes)"


def unique_keys(samples: Iterator[Sample]) -> Iterator[Sample]:
    """(shard, key) is unique in the output: a sample whose key came earlier in the same shard
    is a `duplicate_key` failure (webdataset itself raises on them)."""
    seen: set[str] = set()
    for sample in samples:
        if sample.skipped is None and sample.error is None:
            if sample.key in seen:
                sample = Sample(key=sample.key, member=sample.member,
                                error=("duplicate_key", f"key {sample.key!r} appears again in this shard: "
                                                        "the first one is kept"))
            else:
                seen.add(sample.key)
        yield sample


def read_files(shard: Shard, timeout: float | None = None, max_bytes: int | None = None) -> Iterator[Sample]:
    """Samples of a folder or list shard; a file that cannot be read in `timeout` seconds is a
    `timeout` failure, one that cannot be read at all is `unreadable`, one over `max_bytes` is
    `too_large` (read no further than the limit)."""
    for i, (url, key) in enumerate(zip(shard.files, shard.keys)):
        text, raw = text_key(key)
        sample = Sample(
            key=text, member=text_key(url)[0], key_bytes=raw,
            caption=shard.captions[i] if shard.captions else None,
            url=shard.urls[i] if shard.urls else None,
        )
        try:
            with deadline(timeout), fsspec.open(url, "rb") as f:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
            if max_bytes is not None and len(data) > max_bytes:
                sample.error = ("too_large", f"over the limit of {max_bytes} bytes (source.max_file_bytes)")
            else:
                sample.data = data
        except TimeoutError as exc:
            sample.error = ("timeout", str(exc))
        except OSError as exc:
            sample.error = ("unreadable", f"{type(exc).__name__}: {exc}")
        yield sample


def read_shard(shard: Shard, timeout: float | None = None, max_bytes: int | None = None) -> Iterator[Sample]:
    """A shard's samples (and skipped tar members), each key once."""
    read = read_tar if shard.kind == "tar" else read_files
    return unique_keys(read(shard, timeout, max_bytes))


def file_url(kind: str, source: str, key: str) -> str | None:
    """Where a folder or list sample's file is (a URL fsspec opens); None for tar members."""
    if kind == "folder":
        return f"{source.rstrip('/')}/{raw_name(key)}"
    if kind == "list":
        return list_entry_url(source, raw_name(key))
    return None


def sample_location(kind: str | None, source: str | None, key: str) -> str | None:
    """Where a sample lives, as people and shell tools take it: a plain path for local files,
    `TAR#KEY` for a tar member, the URL for remote objects; None when the source is unknown."""
    if not source or kind not in ("tar", "folder", "list"):
        return None
    where = f"{source}#{key}" if kind == "tar" else file_url(kind, source, key)
    return where.removeprefix("file://") if where.startswith("file:///") else where


def read_images(kind: str, source: str, keys: list[str],
                ranges: dict[str, tuple[int, int]] | None = None) -> dict[str, bytes]:
    """The encoded images of some samples, read back from their source (thumbnails, reviews).

    `kind` and `source` are those a shard's stats file records. A tar member whose (offset, size)
    `ranges` gives (the part records them for uncompressed tars) is read by that range alone;
    other tar members by reading the tar, where the first sample of a key is the one that was
    embedded. Keys the source no longer holds, or cannot be read, are left out of the result.
    """
    found: dict[str, bytes] = {}
    if kind == "tar":
        wanted = set(keys)
        ranged = sorted((ranges[k], k) for k in keys if ranges and k in ranges)  # in file order
        if ranged:
            try:
                with fsspec.open(source, "rb") as f:  # opened once for all of them
                    for (offset, size), key in ranged:
                        f.seek(offset)
                        data = f.read(size)
                        if len(data) == size:
                            found[key] = data
                            wanted.discard(key)
            except OSError:
                pass  # what is still wanted is looked for by reading the tar
        if wanted:
            for sample in read_shard(Shard(name="", kind="tar", url=source)):
                if sample.key in wanted and sample.data is not None:
                    found[sample.key] = sample.data
        return found
    for key in keys:
        url = file_url(kind, source, key)
        try:
            with fsspec.open(url, "rb") as f:
                found[key] = f.read()
        except OSError:
            continue
    return found
