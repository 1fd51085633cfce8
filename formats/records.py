"""The typed records of the embeddings directory: its manifest (EmbeddingsManifest), a shard's
stats marker (ShardStats) and a part's row (PartRow, from which the part's columns and Parquet
schema are derived). Each owns its building, its JSON and its validation: a file that does not
decode as its record is Corrupt, with one line naming the file and what is wrong.

The JSON field names are the on-disk contract: directories written by earlier versions read
(unknown fields are ignored, fields added later have defaults), and files are written with their
keys sorted and indented, as before.
"""
from __future__ import annotations

import builtins
from typing import Annotated, Any, get_type_hints

import msgspec
import pyarrow as pa

from imgindex.errors import Corrupt

EMBEDDINGS_FORMAT = "imgindex.embeddings/1"

_ENCODER = msgspec.json.Encoder(order="sorted")


def encode(record: msgspec.Struct) -> bytes:
    """A record as the indented JSON, keys sorted, that its file holds."""
    return msgspec.json.format(_ENCODER.encode(record), indent=2)


def decode(cls: type, data: bytes | str, where: str, advice: str):
    """`data` (the text of the file `where`) as a `cls`; anything else is Corrupt, in one line."""
    try:
        return msgspec.json.decode(data, type=cls)
    except msgspec.ValidationError as exc:
        raise Corrupt(f"{where} is damaged ({exc}): {advice}") from None
    except msgspec.DecodeError as exc:
        raise Corrupt(f"{where} is not valid JSON ({exc}): {advice}") from None


def convert(cls: type, value: object, where: str, advice: str):
    """An already parsed value (e.g. the embeddings manifest inside an index manifest) as a `cls`."""
    try:
        return msgspec.convert(value, type=cls)
    except msgspec.ValidationError as exc:
        raise Corrupt(f"{where} is damaged ({exc}): {advice}") from None


# -- the embeddings manifest ------------------------------------------------------------------

class ModelInfo(msgspec.Struct, kw_only=True):
    """Which backbone made the vectors (timm's name; the rest is what its pretrained config says)."""

    name: str
    architecture: str | None = None
    tag: str | None = None
    num_classes: int | None = None
    pooled: bool | None = None


# Manifest fields that decide what the vectors are; a run that differs in any of them must not
# add parts to the same directory.
IDENTITY_FIELDS = ("model", "weights", "data_config", "preprocess", "dim", "dtype", "normalized", "precision",
                   "decode")


class EmbeddingsManifest(msgspec.Struct, kw_only=True):
    """OUT/_manifest.json: the identity fields (what decides the vectors), then how the job ran.

    `weights` is what the weights loader reports (its keys depend on the source: checkpoint,
    package, hub, random, synthetic); `sha256` (of the state dict) is its identity."""

    format: str = EMBEDDINGS_FORMAT
    model: ModelInfo
    weights: dict[str, Any]
    data_config: dict[str, Any] = {}
    preprocess: list[Any] = []
    dim: Annotated[int, msgspec.Meta(ge=1)]
    dtype: str = "float32"
    normalized: bool
    precision: str
    decode: dict[str, Any]
    # how the job ran (absent from synthetic directories)
    device: str | None = None
    schedule: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    created: str | None = None

    @property
    def weights_sha256(self) -> str | None:
        return self.weights.get("sha256")

    @property
    def weights_source(self) -> str | None:
        return self.weights.get("source")

    def identity(self) -> dict:
        """What decides the vectors: the identity fields, of the model its name and of the weights
        their digest (not where they were read from)."""
        ident = {name: getattr(self, name) for name in IDENTITY_FIELDS}
        ident["weights"] = {"sha256": self.weights_sha256}
        ident["model"] = {"name": self.model.name}
        return ident

    def identity_changes(self, new: EmbeddingsManifest) -> list[str]:
        """The identity fields in which `new` differs (empty: the same vectors)."""
        a, b = self.identity(), new.identity()
        return [name for name in IDENTITY_FIELDS if a[name] != b[name]]

    def to_json(self) -> bytes:
        return encode(self)

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)

    @classmethod
    def from_json(cls, data: bytes | str, where: str) -> EmbeddingsManifest:
        return decode(cls, data, where, "re-embed into a new --out")

    @classmethod
    def from_dict(cls, value: object, where: str, advice: str = "re-embed into a new --out") -> EmbeddingsManifest:
        return convert(cls, value, where, advice)


# -- a shard's stats marker -------------------------------------------------------------------

class ShardStats(msgspec.Struct, kw_only=True):
    """OUT/_stats/part-SHARD.json, written last (the shard is done): its source and counts (rows +
    failures = samples; tar members that are no sample counted apart, by reason), and how it ran."""

    shard: str
    kind: str | None = None  # the source's kind (tar, files, parquet...): where its samples are read back
    source: str | None = None  # the source's URL
    samples: Annotated[int, msgspec.Meta(ge=0)]
    rows: Annotated[int, msgspec.Meta(ge=0)]
    failures: Annotated[int, msgspec.Meta(ge=0)]
    failures_by_error: dict[str, int] = {}
    near_constant: int = 0
    skipped_members: dict[str, int] = {}
    worker: str | None = None
    batch_size: int | None = None
    seconds: float | None = None
    decode_seconds: float | None = None
    model_seconds: float | None = None
    images_per_s: float | None = None
    finished: str | None = None
    parquet: dict[str, Any] | None = None  # a Parquet source's layout (image and key columns, row groups)

    def __post_init__(self) -> None:
        if self.rows + self.failures != self.samples:
            raise ValueError(f"shard {self.shard}: {self.rows} rows + {self.failures} failures != "
                             f"{self.samples} samples")

    def to_json(self) -> bytes:
        return encode(self)

    @classmethod
    def from_json(cls, data: bytes | str, where: str) -> ShardStats:
        return decode(cls, data, where, "delete it to embed the shard again")


# -- a part's row -----------------------------------------------------------------------------

class PartRow(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One embedded sample's values in its part, besides its shard and vector. The part's columns
    are these fields in this order (after key come shard and embedding); each field's Arrow type
    is in its annotation. Rows are made at embedding speed, so a PartRow is not validated."""

    key: Annotated[str, pa.string()]
    key_bytes: Annotated[builtins.bytes | None, pa.binary()]  # the original name's bytes when it is not UTF-8
    width: Annotated[int, pa.int32()]
    height: Annotated[int, pa.int32()]
    bytes: Annotated[int, pa.int64()]  # of the encoded file
    member_offset: Annotated[int | None, pa.int64()]  # where the image's bytes start in an uncompressed tar
    grayscale: Annotated[bool | None, pa.bool_()]
    sha256: Annotated[str | None, pa.string()]
    phash: Annotated[int | None, pa.int64()]
    caption: Annotated[str | None, pa.string()]
    json: Annotated[str | None, pa.string()]
    url: Annotated[str | None, pa.string()]


ROW_FIELDS: tuple[str, ...] = PartRow.__struct_fields__
_ROW_TYPES = {name: hint.__metadata__[0] for name, hint in get_type_hints(PartRow, include_extras=True).items()}


def row_columns() -> dict[str, list]:
    """Empty columns, one per PartRow field: how rows are gathered (a column at a time)."""
    return {name: [] for name in ROW_FIELDS}


def add_row(columns: dict[str, list], row: PartRow) -> None:
    for name, value in zip(ROW_FIELDS, msgspec.structs.astuple(row)):
        columns[name].append(value)


def part_schema(dim: int) -> pa.Schema:
    """A part's Parquet schema: key, shard, the vector, then the rest of PartRow's fields."""
    return pa.schema([("key", _ROW_TYPES["key"]), ("shard", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                      *((name, _ROW_TYPES[name]) for name in ROW_FIELDS[1:])])
