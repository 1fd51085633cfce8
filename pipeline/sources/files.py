"""Image folders and file lists: planned as shards of `source.folder_shard_size` files, read
file by file.

A folder is searched recursively (extensions in any case), its keys the paths relative to it.
A file list is a .txt or .lst (one path a line, relative to the list's folder, `#` comments) or
a Parquet file with a `source.list_column` column (and optional `caption` and `url`).
"""
from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pyarrow.parquet as pq

from imgindex.errors import ConfigError
from imgindex.formats.names import text_key
from imgindex.formats.samples import IMAGE_EXTENSIONS, list_entry_url
from imgindex.pipeline.config import SourceConfig
from imgindex.pipeline.sources.deadline import deadline
from imgindex.pipeline.sources.shards import PARQUET_SUFFIX, TAR_SUFFIXES, Sample, Shard, safe_name, stem


def is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


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


def folder_shards(fs: fsspec.AbstractFileSystem, root: str, config: SourceConfig) -> list[Shard]:
    found = fs.find(root)
    paths = sorted(p for p in found if is_image_name(p))
    if not paths:
        if any(p.lower().endswith(TAR_SUFFIXES) for p in found):
            raise ConfigError(f"folder {root!r} holds tar shards, not images: pass them, e.g. '{root}/*.tar'")
        if any(p.lower().endswith(PARQUET_SUFFIX) for p in found):
            raise ConfigError(f"folder {root!r} holds Parquet files, not images: pass them, e.g. '{root}/*.parquet'")
        raise ConfigError(
            f"image folder {root!r} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    prefix = root.rstrip("/") + "/"
    keys = [p[len(prefix):] if p.startswith(prefix) else p for p in paths]
    files = [fs.unstrip_protocol(p) for p in paths]
    return _chunks("folder", safe_name(stem(root)), fs.unstrip_protocol(root), files, keys, config.folder_shard_size)


def list_shards(fs: fsspec.AbstractFileSystem, path: str, config: SourceConfig) -> list[Shard]:
    """A text or Parquet file list's shards (a Parquet list is one whose columns hold no image:
    pipeline.sources.parquet tells them apart)."""
    captions = urls = None
    if path.lower().endswith(PARQUET_SUFFIX):
        names = pq.read_schema(path, filesystem=fs).names
        if config.list_column not in names:
            raise ConfigError(
                f"file list {path!r} has no column {config.list_column!r} "
                f"(columns: {', '.join(names)}); set source.list_column"
            )
        table = pq.read_table(path, filesystem=fs,
                              columns=[c for c in (config.list_column, "caption", "url") if c in names])
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
    return _chunks("list", safe_name(stem(path)), list_url, files, entries,
                   config.folder_shard_size, captions, urls)


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
