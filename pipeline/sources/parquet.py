"""Parquet files whose rows hold image bytes (Hugging Face datasets, img2dataset's `parquet`
output): planned from their footers, read row group by row group with bounded memory.

A file is one shard; one of more than `source.folder_shard_size` rows is cut at row-group
boundaries into shards named `<stem>-rg<first row group>`. A `.parquet` source with no image
column but a `source.list_column` column is a file list (pipeline.sources.files). Every row of a
shard is a sample (embedded, or a failure: `empty`, `too_large`, `no_key`, `unreadable`,
`timeout` or a decode class) or, for img2dataset's failed downloads (`status` other than
`success`), a skip counted by its status. Passthrough: `caption` (else `text`, else `txt`),
`url`, and every scalar column of the row as one JSON object in `json`, as img2dataset's
`.json` sidecar holds them.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgindex.errors import ConfigError
from imgindex.formats.parquet_images import ParquetImages, image_cells, image_column, layout, opened, row_key
from imgindex.pipeline.config import SourceConfig
from imgindex.pipeline.sources.deadline import deadline
from imgindex.pipeline.sources.files import list_shards
from imgindex.pipeline.sources.shards import Sample, Shard, safe_name, stem

CAPTION_COLUMNS = ("caption", "text", "txt")
BATCH_BYTES = 2**25  # rows are read in batches of about this many image bytes (at most 1024 rows)
PAGE_SLACK = 2**16  # what a one-row group's image column may declare beyond the image itself
UNREADABLE = "not a readable Parquet file (truncated, or no Parquet at all)"
READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)  # TimeoutError is an OSError

Footer = tuple[pa.Schema, pq.FileMetaData] | str  # the file's schema and metadata, or why it is unreadable


def read_footers(urls: list[str], timeout: float | None = None) -> list[Footer]:
    """The footers of Parquet files (a few fetched at a time: planning thousands of remote files
    waits on round trips, not bytes)."""
    def footer(url: str) -> Footer:
        try:
            with opened(url) as parquet:
                return parquet.schema_arrow, parquet.metadata
        except READ_ERRORS as exc:
            return _one_line(exc)

    if len(urls) < 2:
        return [footer(url) for url in urls]
    with ThreadPoolExecutor(min(16, len(urls)), thread_name_prefix="footer") as pool:
        return list(pool.map(footer, urls))


def parquet_shards(fs: fsspec.AbstractFileSystem, path: str, footer: Footer, config: SourceConfig) -> list[Shard]:
    """A Parquet source's shards: image rows by row-group ranges, or a file list's chunks.
    Raises ConfigError (one line) for a file that is neither, or whose named column is wrong."""
    url, name = fs.unstrip_protocol(path), safe_name(stem(path))
    if isinstance(footer, str):  # e.g. truncated: the job goes on, and the shard records why
        return [Shard(name=name, kind="parquet", url=url, unreadable=footer)]
    schema, meta = footer
    found = image_column(schema, path, config.image_column)
    if found is None:
        if config.list_column in schema.names:
            return list_shards(fs, path, config)
        raise ConfigError(
            f"Parquet file {path!r} holds no image column (a struct with a binary `bytes` field, or a binary column "
            f"named image, img, jpg, png, webp...) and no {config.list_column!r} column of a file list "
            f"(columns: {', '.join(schema.names)}): set source.image_column or source.list_column")
    ranges = _ranges([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], config.folder_shard_size)
    return [Shard(name=name if len(ranges) == 1 else f"{name}-rg{first:05d}", kind="parquet", url=url,
                  parquet=layout(schema, *found, (first, end), first_row))
            for first, end, first_row in ranges]


def _ranges(sizes: list[int], limit: int) -> list[tuple[int, int, int]]:
    """Consecutive row groups of at most `limit` rows together (a larger group alone):
    (first group, end group, first row)."""
    ranges, first, rows, row = [], 0, 0, 0
    for group, size in enumerate(sizes):
        if group > first and rows + size > limit:
            ranges.append((first, group, row - rows))
            first, rows = group, 0
        rows += size
        row += size
    ranges.append((first, len(sizes), row - rows))
    return ranges


@dataclass(frozen=True)
class _Columns:
    """The columns a shard's rows are read with, besides the image."""

    key: str | None
    status: str | None
    caption: str | None
    url: str | None
    meta: tuple[str, ...]  # scalar columns, passed through as one JSON object

    @classmethod
    def of(cls, schema: pa.Schema, images: ParquetImages) -> "_Columns":
        text = {f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)}
        scalar = tuple(f.name for f in schema if f.name != images.image and _is_scalar(f.type))
        return cls(key=images.key, status="status" if images.status else None,
                   caption=next((c for c in CAPTION_COLUMNS if c in text), None),
                   url="url" if "url" in text else None, meta=scalar)

    def names(self) -> list[str]:
        wanted = [self.key, self.status, self.caption, self.url, *self.meta]
        return list(dict.fromkeys(c for c in wanted if c))


def _is_scalar(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
            or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_decimal(kind)
            or pa.types.is_temporal(kind))


def read_parquet(shard: Shard, timeout: float | None = None, max_bytes: int | None = None) -> Iterator[Sample]:
    """Samples of a Parquet shard, one per row of its row groups, read a batch at a time (the
    image column's declared size sets the batch, so memory stays bounded). A one-row group that
    declares an image over `max_bytes` is a `too_large` failure without reading it; any other cell
    over it is one without decoding it. A row group that cannot be read (or takes over `timeout`
    seconds) makes each of its rows not yet read an `unreadable` (or `timeout`) failure; a file
    that cannot be opened is one `bad_shard` failure."""
    if shard.unreadable or shard.parquet is None:
        yield _bad_shard(shard, f"{UNREADABLE}: {shard.unreadable}")
        return
    images = shard.parquet
    with contextlib.ExitStack() as stack:
        try:
            with deadline(timeout):
                parquet = stack.enter_context(opened(shard.url))
        except READ_ERRORS as exc:
            yield _bad_shard(shard, f"{UNREADABLE}: {_one_line(exc)}")
            return
        names = parquet.schema_arrow.names
        missing = [c for c in (images.image, images.key, "status" if images.status else None) if c and c not in names]
        if missing:
            yield _bad_shard(shard, f"column {missing[0]!r} is gone: the file changed after the job was planned")
            return
        columns = _Columns.of(parquet.schema_arrow, images)
        row = images.first_row
        for group in range(*images.row_groups):
            size = parquet.metadata.row_group(group).num_rows if group < parquet.metadata.num_row_groups else 0
            yield from _read_group(parquet, group, row, images, columns, timeout, max_bytes)
            row += size


def _bad_shard(shard: Shard, message: str) -> Sample:
    return Sample(key="#unreadable", member=shard.url, error=("bad_shard", message))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def declared_image_bytes(group: pq.RowGroupMetaData, images: ParquetImages) -> int:
    """What a row group's footer declares for its image column, uncompressed."""
    path = f"{images.image}.bytes" if images.struct else images.image
    return sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
               if group.column(i).path_in_schema == path)


def _read_group(parquet: pq.ParquetFile, group: int, first: int, images: ParquetImages, columns: _Columns,
                timeout: float | None, max_bytes: int | None) -> Iterator[Sample]:
    try:
        meta = parquet.metadata.row_group(group)
    except (IndexError, *READ_ERRORS) as exc:  # the file changed since the plan
        yield Sample(key=f"#row-group-{group}", member=f"row group {group}",
                     error=("unreadable", f"row group {group} is gone from the file: {_one_line(exc)}"))
        return
    rows, declared = meta.num_rows, declared_image_bytes(meta, images)
    oversized = max_bytes is not None and rows == 1 and declared - PAGE_SLACK > max_bytes
    names = columns.names() if oversized else [images.image, *columns.names()]
    batch_rows = max(1, min(1024, BATCH_BYTES // max(1, declared // max(1, rows))))
    too_large = (f"row group {group} declares {declared} bytes for its one image, over the limit of {max_bytes} "
                 "(source.max_file_bytes): not read") if oversized else None
    done = 0
    try:
        batches = parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=names, use_threads=False)
        while True:
            with deadline(timeout):
                batch = next(batches, None)
            if batch is None:
                break
            yield from _samples(batch, first + done, images, columns, max_bytes, too_large)
            done += batch.num_rows
    except READ_ERRORS as exc:
        yield from _lost_rows(parquet, group, first, done, rows, images, exc)


def _samples(batch: pa.RecordBatch, first: int, images: ParquetImages, columns: _Columns, max_bytes: int | None,
             too_large: str | None) -> Iterator[Sample]:
    values = {name: batch.column(name).to_pylist() for name in columns.names()}
    cells = None if too_large else image_cells(batch, images)
    sizes = pc.binary_length(cells).to_pylist() if cells is not None else []
    has_paths = cells is not None and images.struct and batch.schema.field(images.image).type.get_field_index("path") >= 0
    paths = pc.struct_field(batch.column(images.image), "path").to_pylist() if has_paths else None
    for i in range(batch.num_rows):
        number = first + i
        key = row_key(values[columns.key][i]) if columns.key else (str(number), None)
        if columns.status and values[columns.status][i] != "success":
            yield Sample(key=key[0] if key else f"#row-{number}", member=f"row {number}",
                         skipped=f"status:{values[columns.status][i]}")
            continue
        if key is None:
            yield Sample(key=f"#row-{number}", member=f"row {number}",
                         error=("no_key", f"row {number} has no key (column {columns.key!r} is null or empty)"))
            continue
        sample = Sample(key=key[0], key_bytes=key[1], member=f"row {number}",
                        caption=values[columns.caption][i] if columns.caption else None,
                        url=values[columns.url][i] if columns.url else None,
                        json=_json({name: values[name][i] for name in columns.meta}) if columns.meta else None)
        size = sizes[i] if cells is not None else None
        if too_large:
            sample.error = ("too_large", too_large)
        elif not size:
            sample.error = ("empty", f"no image bytes in column {images.image!r}" + (
                f" (the cell names {paths[i]!r} but holds no bytes: its images were not embedded in the file)"
                if paths and paths[i] else ""))
        elif max_bytes is not None and size > max_bytes:
            sample.error = ("too_large", f"{size} bytes is over the limit of {max_bytes} (source.max_file_bytes)")
        else:
            sample.data = cells[i].as_py()
        yield sample


def _json(row: dict) -> str:
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, ensure_ascii=False, default=str)


def _lost_rows(parquet: pq.ParquetFile, group: int, first: int, done: int, rows: int, images: ParquetImages,
               exc: BaseException) -> Iterator[Sample]:
    """Each row of a row group that could not be read is a failure, keyed by its key column when
    that still reads (a bad image page leaves the keys readable), else by its row number."""
    kind = "timeout" if isinstance(exc, TimeoutError) else "unreadable"
    message = f"row group {group} (rows {first} to {first + rows - 1}) is unreadable: {_one_line(exc)}"
    keys = None
    if images.key and kind == "unreadable":
        with contextlib.suppress(*READ_ERRORS):
            keys = parquet.read_row_group(group, columns=[images.key], use_threads=False).column(0).to_pylist()
    for i in range(done, rows):
        number = first + i
        key = row_key(keys[i]) if keys else (None if images.key else (str(number), None))
        yield Sample(key=key[0] if key else f"#row-{number}", key_bytes=key[1] if key else None,
                     member=f"row {number}", error=(kind, message))
