"""Where a sample lives, and reading it back: part of the on-disk contract.

A part row names its sample by (shard, key); the shard's stats file records its `kind` and
`source`. These rules join them back to a place people and tools can use and to the encoded
image: the location rule (`sample_location`: a path, `TAR#KEY`, `FILE.parquet#KEY` or a URL),
how tar members group into samples (`split_name`, `image_member`), and `read_images`
(thumbnails, search pages, dedup reviews). Keys are names escaped by `formats.names`. The
pipeline reads sources by the same rules; nothing here imports it.
"""
from __future__ import annotations

import lzma
import re
import tarfile
import zlib

import fsspec

from imgindex.formats import parquet_images
from imgindex.formats.names import raw_name, text_key

IMAGE_EXTENSIONS = frozenset(
    "jpg jpeg jpe jfif png webp bmp gif tif tiff ppm pgm pbm pnm ico".split()
)
KINDS = ("tar", "folder", "list", "parquet")  # the kinds of source a sample can be read back from


def split_name(name: str) -> tuple[str, str]:
    """Tar member name -> (key, extension) by webdataset's rule: the key runs to the first dot of
    the base name. A base name outside the rule (hidden, such as `x/.a.jpg`, or with no extension)
    is a sample of its own, keyed by the whole name with no extension, so its bytes decide whether
    it is an image; this holds in sub-folders too (webdataset's own pattern would key `x/.a.jpg`
    and `x/.b.jpg` both `x/`)."""
    name = name.removeprefix("./")
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def is_meta_member(name: str) -> bool:
    """A webdataset metadata member (`__name__`, or inside such a folder): no part of any sample."""
    return re.match(r"__[^/]*__($|/)", name) is not None


def image_member(extensions: list[str]) -> str | None:
    """Which member of a tar sample (by extension, in tar order) is its image: the first with an
    image extension, or a lone member with no extension (its bytes decide); None: no image."""
    images = [ext for ext in extensions if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    if images:
        return images[0]
    return "" if extensions == [""] else None


def list_entry_url(list_url: str, entry: str) -> str:
    """Entries of a file list are URLs, absolute paths, or paths relative to the list's folder."""
    if "://" in entry or entry.startswith("/"):
        return entry
    return f"{list_url.rsplit('/', 1)[0]}/{entry}"


def file_url(kind: str, source: str, key: str) -> str | None:
    """Where a folder or list sample's file is (a URL fsspec opens); None for tar and Parquet rows."""
    if kind == "folder":
        return f"{source.rstrip('/')}/{raw_name(key)}"
    if kind == "list":
        return list_entry_url(source, raw_name(key))
    return None


def sample_location(kind: str | None, source: str | None, key: str) -> str | None:
    """Where a sample lives, as people and shell tools take it: a plain path for local files,
    `TAR#KEY` for a tar member, `FILE.parquet#KEY` for a Parquet row (the row whose key column
    holds KEY, or row number KEY of a file without one), the URL for remote objects; None when
    the source is unknown."""
    if not source or kind not in KINDS:
        return None
    where = f"{source}#{key}" if kind in ("tar", "parquet") else file_url(kind, source, key)
    return where.removeprefix("file://") if where.startswith("file:///") else where


def read_images(kind: str, source: str, keys: list[str], ranges: dict[str, tuple[int, int]] | None = None,
                parquet: dict | None = None) -> dict[str, bytes]:
    """The encoded images of some samples, read back from their source (thumbnails, reviews).

    `kind` and `source` are those a shard's stats file records (and `parquet`, its record of a
    Parquet shard's columns and row groups). A tar member whose (offset, size) `ranges` gives (the
    part records them for uncompressed tars) is read by that range alone; other tar members by
    reading the tar, where the first sample of a key is the one that was embedded. A Parquet row
    is read from its row group alone. Keys the source no longer holds, or cannot be read, are left
    out of the result.
    """
    if kind == "parquet":
        return parquet_images.read_back(source, keys, parquet)
    found: dict[str, bytes] = {}
    if kind == "tar":
        wanted = set(keys)
        ranged = sorted((ranges[k], k) for k in keys if ranges and k in ranges)  # in file order
        if ranged:
            try:
                # opened once for all of them; each member by its own range request on object stores
                # (their files read ahead a block, 50 MB on S3: the whole tar for one thumbnail)
                fs, path = fsspec.core.url_to_fs(source)
                with fs.open(path, "rb", cache_type="none") as f:
                    for (offset, size), key in ranged:
                        f.seek(offset)
                        data = f.read(size)
                        if len(data) == size:
                            found[key] = data
                            wanted.discard(key)
            except OSError:
                pass  # what is still wanted is looked for by reading the tar
        if wanted:
            found.update(_scan_tar(source, wanted))
        return found
    for key in keys:
        url = file_url(kind, source, key)
        try:
            with fsspec.open(url, "rb") as f:
                found[key] = f.read()
        except OSError:
            continue
    return found


def _scan_tar(source: str, wanted: set[str]) -> dict[str, bytes]:
    """The image members of `wanted` keys, reading the tar front to back (compressed or not);
    members are grouped into samples as the pipeline groups them, and a key's first sample is
    the one taken. What the tar cannot give (it is gone, or unreadable from some point) is left
    out."""
    found: dict[str, bytes] = {}
    done: set[str] = set()
    key, members = None, {}  # the sample being read: extension -> its bytes (read only when wanted)

    def close() -> None:
        ext = image_member(list(members))
        if key is None or key in done or ext is None:  # a sample with no image does not claim its key
            return
        done.add(key)
        text = text_key(key)[0]
        if text in wanted and members[ext] is not None:
            found[text] = members[ext]

    try:
        with fsspec.open(source, "rb") as f, tarfile.open(fileobj=f, mode="r|*", ignore_zeros=True) as tar:
            for info in tar:
                if not info.isreg() or is_meta_member(info.name):
                    continue
                prefix, ext = split_name(info.name)
                if (prefix != key or ext in members) and members:
                    close()
                    members = {}
                key = prefix
                interesting = text_key(prefix)[0] in wanted and prefix not in done
                members[ext] = tar.extractfile(info).read() if interesting else None
            close()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError):
        pass
    return found
