"""Sources -> a sorted plan of Shards, and a Shard -> its samples (raw bytes, not decoded).

Stages, one module each: `plan` (SOURCE arguments -> Shards), `tar`, `files` (folders and
file lists), `parquet` (Parquet files holding image bytes), `read` (a shard's samples, each key
once), `deadline` (the read time limit), `shards` (the Shard and Sample records). The rules a
sample is found back by (key escape, location, read-back) are on-disk contract and live in
imgindex.formats (names, samples, parquet_images).
"""
from imgindex.formats.names import printable, raw_name, text_key
from imgindex.formats.samples import IMAGE_EXTENSIONS, list_entry_url, read_images, sample_location
from imgindex.pipeline.sources.deadline import deadline
from imgindex.pipeline.sources.files import read_files
from imgindex.pipeline.sources.parquet import read_parquet
from imgindex.pipeline.sources.plan import plan_shards
from imgindex.pipeline.sources.read import read_shard, unique_keys
from imgindex.pipeline.sources.shards import Sample, Shard
from imgindex.pipeline.sources.tar import read_tar

__all__ = ["IMAGE_EXTENSIONS", "Sample", "Shard", "deadline", "list_entry_url", "plan_shards", "printable",
           "raw_name", "read_files", "read_images", "read_parquet", "read_shard", "read_tar", "sample_location",
           "text_key", "unique_keys"]
