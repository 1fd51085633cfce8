"""A shard -> its samples, whatever its kind, each key once."""
from __future__ import annotations

from collections.abc import Iterator

from imgindex.pipeline.sources.files import read_files
from imgindex.pipeline.sources.parquet import read_parquet
from imgindex.pipeline.sources.shards import Sample, Shard
from imgindex.pipeline.sources.tar import read_tar

READERS = {"tar": read_tar, "folder": read_files, "list": read_files, "parquet": read_parquet}


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


def read_shard(shard: Shard, timeout: float | None = None, max_bytes: int | None = None) -> Iterator[Sample]:
    """A shard's samples (and skipped tar members or rows), each key once."""
    return unique_keys(READERS[shard.kind](shard, timeout, max_bytes))
