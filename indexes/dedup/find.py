"""Duplicates among an index's images, and images of another embeddings directory that leak
into it: the tiers, then pairs and groups as tables. No step holds more than O(N) memory
besides the index and a disk-backed copy of the vectors."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgindex.errors import ConfigError
from imgindex.indexes.dedup.corpus import Corpus
from imgindex.indexes.dedup.groups import GROUP_SCHEMA, group_duplicates
from imgindex.indexes.dedup.tiers import METHODS, PAIR_SCHEMA, DedupOptions, Pairs, find_pairs
from imgindex.formats.embeddings_dir import EmbeddingsDir
from imgindex.indexes.query import Searcher
from imgindex.formats.embeddings_dir import identity_changes


@dataclass
class DedupResult:
    pairs: pa.Table  # PAIR_SCHEMA
    groups: pa.Table  # GROUP_SCHEMA, members of groups of two or more
    stats: dict = field(default_factory=dict)

    @property
    def removed(self) -> int:
        return int(self.groups.num_rows - pc.sum(self.groups["keep"]).as_py()) if self.groups.num_rows else 0


def _pairs_table(queries: Corpus, db: Corpus, pairs: Pairs) -> pa.Table:
    return pa.table({
        "a_shard": queries.meta["shard"].take(pairs.a), "a_key": queries.meta["key"].take(pairs.a),
        "b_shard": db.meta["shard"].take(pairs.b), "b_key": db.meta["key"].take(pairs.b),
        "similarity": pairs.similarity, "kind": np.asarray(METHODS)[pairs.kinds],
        "phash_distance": pa.array(pairs.distance, pa.int32(), mask=~pairs.distance_valid),
    }, schema=PAIR_SCHEMA)


def _searcher(index: str | Path | Searcher) -> Searcher:
    return index if isinstance(index, Searcher) else Searcher(index)


def _tiers(options: DedupOptions) -> dict:
    """What the enabled tiers are, as the outputs and the report state them."""
    return {"methods": list(options.methods), "keep": options.keep,
            "threshold": options.threshold if "embedding" in options.methods else None,
            "phash_distance": options.phash_distance if "phash" in options.methods else None}


def find_duplicates(index: str | Path | Searcher, options: DedupOptions | None = None, progress: bool | None = None,
                    workdir: str | None = None) -> DedupResult:
    """Duplicates among the images of an index (a directory or a loaded Searcher): pairs (every
    tier that is on) and kept/removed groups."""
    options = options or DedupOptions()
    options.check()
    started = time.time()
    searcher = _searcher(index)
    stats: dict = {"images": int(searcher.manifest["count"]), **_tiers(options)}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="imgindex-dedup-") as tmp:
        corpus = Corpus.of_index(searcher, Path(tmp), progress)
        found = find_pairs(searcher, corpus, corpus, options, True, stats, progress)
        pairs = _pairs_table(corpus, corpus, found)
        groups = group_duplicates(corpus, found.a, found.b, options)
    stats.update(pairs=pairs.num_rows, groups=len(set(groups["group_id"].to_pylist())),
                 in_groups=groups.num_rows, seconds=round(time.time() - started, 2))
    result = DedupResult(pairs, groups, stats)
    stats["removed"] = result.removed
    return result


def find_leaks(index: str | Path | Searcher, against: str, options: DedupOptions | None = None,
               progress: bool | None = None, workdir: str | None = None) -> DedupResult:
    """Which images of the embeddings directory `against` (e.g. a test set) have a duplicate in
    the index (e.g. the training set). Pairs are (a = against image, b = indexed image)."""
    options = options or DedupOptions()
    options.check()
    started = time.time()
    searcher = _searcher(index)
    test = EmbeddingsDir(against)
    changed = identity_changes(test.manifest, searcher.manifest["embeddings"])
    if changed:
        raise ConfigError(f"{against} was embedded differently from the index (changed: {', '.join(changed)}): "
                          "embed it with the same config")
    test_parts = test.parts()
    if not test_parts:
        raise ConfigError(f"{against} has no complete parts: run `imgindex embed` first")
    stats: dict = {"against": against, **_tiers(options)}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="imgindex-leaks-") as tmp:
        train = Corpus.of_index(searcher, Path(tmp), progress)
        queries = Corpus([(test, p) for p in test_parts], test.dim, Path(tmp), progress, name="against")
        found = find_pairs(searcher, queries, train, options, False, stats, progress)
        pairs = _pairs_table(queries, train, found)
        stats.update(images=len(queries), leaked=int(len(np.unique(found.a))), pairs=pairs.num_rows,
                     seconds=round(time.time() - started, 2))
    return DedupResult(pairs, GROUP_SCHEMA.empty_table(), stats)
