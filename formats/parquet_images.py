"""Parquet files that hold images: which column has the encoded bytes, what names a row, and
reading rows back. Part of the on-disk contract: a Parquet shard's stats file records its
layout (`ParquetImages.to_dict`), and thumbnails, pages and dedup lists find a row by it.

The image column is a struct with a binary `bytes` field (the Hugging Face `datasets` Image
feature: `{bytes, path}`) or a binary column named like an image (`image`, `img`, `jpg`,
`png`, `webp`...: img2dataset's `parquet` output names it after its encode format), or the
column `source.image_column` names. A row's key is its `key`, `__key__` or `id` column (the
first there), else its row number in the file. img2dataset's `status` column (beside its
`error_message`) marks rows whose download failed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from imgindex.errors import ConfigError
from imgindex.formats.names import text_key

IMAGE_COLUMN_NAMES = frozenset("image img jpg jpeg png webp bmp gif tif tiff".split())
KEY_COLUMNS = ("key", "__key__", "id")
STATUS_COLUMNS = ("status", "error_message")  # img2dataset's: both present
READ_BUFFER = 2**23  # pages are read through an 8 MiB buffer, never a whole column chunk at once


@dataclass(frozen=True)
class ParquetImages:
    """Where a Parquet shard's images are: the image column (a struct's `bytes` field when
    `struct`), the key column (None: row numbers), whether img2dataset's status column is there,
    and the shard's row groups [first, end), whose first row is row `first_row` of the file."""

    image: str
    struct: bool
    key: str | None
    status: bool
    row_groups: tuple[int, int]
    first_row: int

    def to_dict(self) -> dict:
        return {**asdict(self), "row_groups": list(self.row_groups)}

    @classmethod
    def from_dict(cls, values: dict) -> "ParquetImages":
        return cls(**{**values, "row_groups": tuple(values["row_groups"])})


@contextlib.contextmanager
def opened(url: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file (local path or fsspec URL), read through a bounded buffer: pages as they
    are needed, never the whole file or a whole column chunk."""
    fs, path = fsspec.core.url_to_fs(url)
    options = {"pre_buffer": False, "buffer_size": READ_BUFFER}
    if isinstance(fs, LocalFileSystem):
        with pq.ParquetFile(path, **options) as parquet:
            yield parquet
        return
    with fs.open(path, "rb") as f, pq.ParquetFile(f, **options) as parquet:
        yield parquet


def is_bytes(kind: pa.DataType) -> bool:
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
            or pa.types.is_fixed_size_binary(kind))


def _is_image_struct(kind: pa.DataType) -> bool:
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and is_bytes(kind.field("bytes").type)


def _kind_name(kind: pa.DataType) -> str:
    return str(kind) if len(str(kind)) < 60 else str(kind)[:57] + "..."


def image_column(schema: pa.Schema, where: str, named: str | None = None) -> tuple[str, bool] | None:
    """(the image column, whether it is a struct with `bytes`); None when the file holds no image
    column (it may be a file list). A named column that is missing or holds no bytes, and a file
    with several image columns, are job errors (ConfigError)."""
    if named is not None:
        if named not in schema.names:
            raise ConfigError(f"Parquet file {where!r} has no column {named!r} (source.image_column); "
                              f"its columns: {', '.join(schema.names)}")
        kind = schema.field(named).type
        if not (is_bytes(kind) or _is_image_struct(kind)):
            raise ConfigError(f"column {named!r} of {where!r} holds {_kind_name(kind)}, not image bytes: set "
                              "source.image_column to a binary column or a struct with a `bytes` field")
        return named, _is_image_struct(kind)
    found = [(f.name, _is_image_struct(f.type)) for f in schema
             if _is_image_struct(f.type) or (is_bytes(f.type) and f.name.lower() in IMAGE_COLUMN_NAMES)]
    if len(found) > 1:
        raise ConfigError(f"Parquet file {where!r} has several image columns ({', '.join(n for n, _ in found)}): "
                          "set source.image_column to the one to embed")
    return found[0] if found else None


def layout(schema: pa.Schema, image: str, struct: bool, row_groups: tuple[int, int] = (0, 0),
           first_row: int = 0) -> ParquetImages:
    """The rest of a file's layout, once its image column is known."""
    key = next((name for name in KEY_COLUMNS if name in schema.names and name != image
                and _is_key_type(schema.field(name).type)), None)
    status = all(name in schema.names for name in STATUS_COLUMNS) and pa.types.is_string(schema.field("status").type)
    return ParquetImages(image, struct, key, status, row_groups, first_row)


def _is_key_type(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind) or is_bytes(kind)


def row_key(value: object) -> tuple[str, bytes | None] | None:
    """A key column's value as a key (and its bytes when the key escapes them, as for names);
    None for a null or empty value."""
    if value is None or value == "" or value == b"":
        return None
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
    return text_key(text)


def image_cells(table: pa.Table | pa.RecordBatch, images: ParquetImages) -> pa.Array:
    """The image column of some rows as a binary array (null where the cell or its bytes are null)."""
    column = table.column(images.image)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return pc.struct_field(column, "bytes") if images.struct else column


def read_back(url: str, keys: list[str], record: dict | None = None) -> dict[str, bytes]:
    """The image bytes of some rows of a Parquet shard, read from their row groups alone: keys
    are looked up in the key column (the first row of a key that has an image, as the job
    embedded), or are row numbers. `record` is the shard's layout as its stats file holds it (without it, the file's
    own columns decide, over the whole file). Rows that are gone or unreadable are left out."""
    found: dict[str, bytes] = {}
    try:
        with opened(url) as parquet:
            meta = parquet.metadata
            if record:
                images = ParquetImages.from_dict(record)
            else:
                detected = image_column(parquet.schema_arrow, url)
                if detected is None:
                    return found
                images = layout(parquet.schema_arrow, *detected, (0, meta.num_row_groups))
            starts, row = {}, images.first_row
            for group in range(*images.row_groups):
                starts[group] = row
                row += meta.row_group(group).num_rows
            wanted: dict[int, list[tuple[int, str]]] = {}
            if images.key is None:
                for key in keys:
                    number = int(key) if key.isascii() and key.isdigit() else -1
                    group = next((g for g, start in starts.items()
                                  if start <= number < start + meta.row_group(g).num_rows), None)
                    if group is not None:
                        wanted.setdefault(group, []).append((number - starts[group], key))
            else:
                asked = set(keys)
                for group in starts:
                    values = parquet.read_row_group(group, columns=[images.key], use_threads=False).column(0)
                    for index, value in enumerate(values.to_pylist()):
                        key = row_key(value)
                        if key is not None and key[0] in asked:
                            wanted.setdefault(group, []).append((index, key[0]))
            for group, rows in sorted(wanted.items()):
                rows = [(index, key) for index, key in rows if key not in found]
                if not rows:
                    continue
                cells = image_cells(parquet.read_row_group(group, columns=[images.image], use_threads=False), images)
                for index, key in rows:
                    data = cells[index].as_py()
                    if data and key not in found:
                        found[key] = data
    except (pa.ArrowException, OSError, ValueError, ConfigError):
        pass
    return found
