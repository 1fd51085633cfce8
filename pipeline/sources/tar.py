"""Tar shards -> samples, by webdataset's rule: consecutive members sharing a key form a sample.

Every member is accounted for (a sample, or a counted skip), a corrupt header or junk is one
recorded `bad_shard` failure, and an uncompressed tar's samples carry their image's byte offset
(so one image is read back by range)."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from imgindex.formats.names import text_key
from imgindex.formats.samples import image_member, is_meta_member, split_name
from imgindex.pipeline.sources.deadline import deadline
from imgindex.pipeline.sources.shards import Sample, Shard

CAPTION_EXTENSIONS = ("txt", "caption")


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
    image = image_member(list(members))
    if image is not None:
        sample.member, sample.data, sample.offset = members[image]
    else:
        sample.member = next(iter(members.values()))[0]
        sample.error = ("no_image", f"no image member for key {text!r} (members: {', '.join(sorted(members))})")
    sample.member = text_key(sample.member)[0]
    return sample


def _member_kind(info: tarfile.TarInfo) -> str | None:
    """Why a tar member is no part of a sample (None: a regular file, which is)."""
    if info.isreg():
        return "webdataset_meta" if is_meta_member(info.name) else None
    for kind, test in (("directory", info.isdir), ("symlink", info.issym), ("hardlink", info.islnk),
                       ("fifo", info.isfifo), ("device", lambda: info.ischr() or info.isblk())):
        if test():
            return kind
    return "other_member_type"


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
                prefix, ext = split_name(info.name)
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
