"""What the plan hands out and the readers give: Shards (one unit of work each, named uniquely)
and Samples (the bytes of one image and its passthrough fields, or why there are none)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from imgindex.formats.parquet_images import ParquetImages

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIXES = (".txt", ".lst")
PARQUET_SUFFIX = ".parquet"  # image bytes in a column, or a file list with a path column

ShardKind = Literal["tar", "folder", "list", "parquet"]


@dataclass(frozen=True)
class Shard:
    """One unit of work: its name is unique in a plan and names the output part."""

    name: str
    kind: ShardKind
    url: str  # the tar, the folder root, the list file or the Parquet file
    files: tuple[str, ...] = ()  # folder and list: full URLs of the images
    keys: tuple[str, ...] = ()  # folder and list: the sample key of each image
    captions: tuple[str | None, ...] = ()
    urls: tuple[str | None, ...] = ()
    parquet: ParquetImages | None = None  # parquet: its image column, key column and row groups
    unreadable: str | None = None  # why the plan could not read this source (its one bad_shard failure)


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
    skipped: str | None = None  # no sample (a tar directory, a failed download...): counted by reason, not embedded
    offset: int | None = None  # where the image's bytes start in an uncompressed tar (read back by range)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "shard"


def stem(path: str) -> str:
    """A source's base name without its kind's suffix: the start of its shard names."""
    base = PurePosixPath(path.rstrip("/")).name
    for suffix in TAR_SUFFIXES + LIST_SUFFIXES + (PARQUET_SUFFIX,):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base
