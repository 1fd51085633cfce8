"""SOURCE arguments -> a sorted plan of uniquely named Shards.

A source is a tar (path, glob, brace pattern or fsspec URL), an image folder, a file list or a
Parquet file (image bytes in a column, or a file list with a path column). The plan is made
once, in the driver; a bad source stops it with one line (ConfigError) before any work.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

from imgindex.errors import ConfigError
from imgindex.pipeline.config import SourceConfig
from imgindex.pipeline.sources.files import folder_shards, list_shards
from imgindex.pipeline.sources.parquet import parquet_shards, read_footers
from imgindex.pipeline.sources.shards import LIST_SUFFIXES, PARQUET_SUFFIX, TAR_SUFFIXES, Shard, safe_name, stem


def expand(source: str) -> list[tuple[fsspec.AbstractFileSystem, str]]:
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


def plan_shards(sources: list[str], config: SourceConfig) -> list[Shard]:
    """Resolve every source into shards, sorted by name, with unique names.

    Raises ConfigError (one line, says what to fix) for a missing or empty source.
    """
    if not sources:
        raise ConfigError("no source given: pass tar shards, image folders, file lists or Parquet files")
    paths = [(fs, path) for source in sources for fs, path in expand(source)]
    parquets = [(fs, path) for fs, path in paths if path.lower().endswith(PARQUET_SUFFIX) and not fs.isdir(path)]
    footers = dict(zip(parquets, read_footers([fs.unstrip_protocol(p) for fs, p in parquets], config.read_timeout_s)))
    shards: list[Shard] = []
    for fs, path in paths:
        lower = path.lower()
        if fs.isdir(path):
            shards.extend(folder_shards(fs, path, config))
        elif lower.endswith(TAR_SUFFIXES):
            shards.append(Shard(name=safe_name(stem(path)), kind="tar", url=fs.unstrip_protocol(path)))
        elif lower.endswith(PARQUET_SUFFIX):
            shards.extend(parquet_shards(fs, path, footers[(fs, path)], config))
        elif lower.endswith(LIST_SUFFIXES):
            shards.extend(list_shards(fs, path, config))
        else:
            raise ConfigError(
                f"source {path!r} is not a tar shard, image folder, file list or Parquet file "
                f"(expected a folder or a name ending in {', '.join(TAR_SUFFIXES + LIST_SUFFIXES + (PARQUET_SUFFIX,))})"
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
            shard = replace(shard, name=f"{shard.name}-{digest}")
        renamed.append(shard)
    names = [s.name for s in renamed]
    if len(set(names)) != len(names):
        raise ConfigError("the same source is given twice: each tar, folder, list or Parquet file may appear once")
    return sorted(renamed, key=lambda s: s.name)
