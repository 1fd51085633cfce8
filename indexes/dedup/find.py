"""Duplicates among an index's images, and images of another embeddings directory that leak
into it: the tiers, then pairs and groups as tables. No step holds more than O(N) memory
besides the index and a disk-backed copy of the vectors."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgindex.errors import ConfigError
from imgindex.executors.placement import Executor
from imgindex.indexes.dedup.corpus import Corpus
from imgindex.indexes.dedup.hash_tiers import hashed_pairs
from imgindex.indexes.dedup.partitions import Scale, against_parts, partitioned_join
from imgindex.indexes.dedup.workdir import NO_PLACE, WorkDir
from imgindex.indexes.dedup.groups import GROUP_SCHEMA, group_duplicates
from imgindex.indexes.dedup.tiers import (METHODS, PAIR_SCHEMA, DedupOptions, Pairs, decide, embedding_candidates,
                                          find_pairs, note_capped, tune_on, tuning_rows)
from imgindex.formats.embeddings_dir import EmbeddingsDir
from imgindex.indexes.query import Searcher

log = logging.getLogger(__name__)


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


def resolve_threshold(searcher: Searcher, options: DedupOptions) -> tuple[DedupOptions, dict]:
    """Check the embedding tier can run, and fix its threshold: as given, or (auto) calibrated on
    planted copies of the corpus's own images with the model the index records. The options with
    a number for a threshold, and what was chosen with its measured recall and precision."""
    if "embedding" not in options.methods:
        return options, {}
    if searcher.manifest.embeddings.weights_source == "random" and not options.allow_random_weights:
        raise ConfigError("the index was embedded with random weights, which cannot tell images apart: the embedding "
                          "tier would call everything a duplicate. Use --method exact,phash, embed with real "
                          "weights (--config lite0 or --checkpoint), or pass --allow-random-weights for plumbing tests")
    if options.threshold != "auto":
        return options, {"threshold_source": "given"}
    if not searcher.manifest.embeddings.config:
        raise ConfigError("--threshold auto plants copies and embeds them with the index's model, which these "
                          "embeddings do not record (synthetic vectors?): pass --threshold, e.g. 0.95")
    from imgindex.indexes.dedup.calibrate import FINE_THRESHOLDS, calibrate, choose_threshold

    try:
        measured = calibrate(searcher, options.calibration_sample, thresholds=FINE_THRESHOLDS)
    except ConfigError as exc:
        raise ConfigError(f"--threshold auto could not calibrate: {exc}; or pass --threshold, e.g. 0.9") from None
    chosen = choose_threshold(measured, options.target_precision)
    options = replace(options, threshold=chosen["threshold"])
    if not chosen["met"]:
        log.warning("no threshold reached precision %.2f on %d planted copies: using %.2f (precision %.3f, "
                    "recall %.3f)", options.target_precision, chosen["copies"], chosen["threshold"],
                    chosen["precision"], chosen["recall"])
    return options, {"threshold_source": "auto", "calibration": {k: chosen[k] for k in (
        "threshold", "recall", "precision", "target_precision", "met", "images", "copies")}}


def _tiers(options: DedupOptions) -> dict:
    """What the enabled tiers are, as the outputs and the report state them."""
    return {"methods": list(options.methods), "keep": options.keep,
            "threshold": options.threshold if "embedding" in options.methods else None,
            "phash_distance": options.phash_distance if "phash" in options.methods else None}


def _pairs_at_scale(searcher: Searcher, scale: Scale, options: DedupOptions, stats: dict,
                    progress: bool | None) -> tuple[Corpus, Pairs]:
    """Every tier's pairs as partition and join tasks (an IVF index's embedding tier; other index
    types are searched in this process), then the rows of those pairs only: their metadata and
    vectors, and the pairs in that corpus's row numbers."""
    candidates = {}
    if {"exact", "phash"} & set(options.methods):
        candidates, stats["hash_partitions"] = hashed_pairs(searcher, scale, options.methods,
                                                            options.phash_distance, progress)
    if "embedding" in options.methods:
        rows, rng = tuning_rows(int(searcher.manifest.count))
        sample = Corpus.of_index(searcher, scale.work.root, False, rows=rows, name="tuning")
        stats["search"] = tune_on(searcher, rows, np.asarray(sample.vectors), rng, options.threshold,
                                  options.max_neighbors + 1)
        if isinstance(faiss.downcast_index(searcher.index), faiss.IndexIVF):
            q, d, _, capped, stats["partitions"] = partitioned_join(searcher, scale, options.threshold,
                                                                    options.max_neighbors, progress)
        else:
            if scale.executor.kind != "local":
                log.warning("a %s index is searched in this process: %s runs only the exact and phash tiers' "
                            "tasks", searcher.manifest.factory, scale.executor.flag)
            whole = Corpus.of_index(searcher, scale.work.root, progress)
            q, d, capped = embedding_candidates(searcher.index, whole, whole, options.threshold,
                                                options.max_neighbors, True, progress)
        candidates["embedding"] = (q, d)
        note_capped(stats, capped, options.max_neighbors)
    held = [np.zeros(0, np.int64)] + [np.r_[a, b] for a, b in candidates.values()]
    rows = np.unique(np.concatenate(held))
    corpus = Corpus.of_index(searcher, scale.work.root, progress, rows=rows)
    local = {kind: (np.searchsorted(rows, a), np.searchsorted(rows, b)) for kind, (a, b) in candidates.items()}
    return corpus, decide(corpus, corpus, local, options, True, stats)


def find_duplicates(index: str | Path | Searcher, options: DedupOptions | None = None, progress: bool | None = None,
                    workdir: str | Path | None = None, executor: Executor | None = None, keep_work: bool = False,
                    device: str = "cpu", precision: str = "auto") -> DedupResult:
    """Duplicates among the images of an index (a directory or a loaded Searcher): pairs (every
    tier that is on) and kept/removed groups.

    The work (partitions, finished tasks) goes to `workdir`/imgindex-dedup-work (default: the
    system's temporary folder) and is removed when the run ends, also when it is interrupted
    unless `keep_work`; a rerun reuses what it finds there. The tasks run on `executor` (default
    this process), the embedding products on `device` (cpu, or cuda) in `precision`."""
    options = options or DedupOptions()
    options.check()
    scale = Scale(None, executor or Executor(), device, precision)
    scale.check()
    if keep_work and workdir is None:  # said before any work (the calibration, the tiers)
        raise ConfigError(NO_PLACE)
    started = time.time()
    searcher = _searcher(index)
    options, chosen = resolve_threshold(searcher, options)
    stats: dict = {"images": int(searcher.manifest.count), **_tiers(options), **chosen}
    with WorkDir(workdir, keep_work) as work:
        scale.work = work
        corpus, found = _pairs_at_scale(searcher, scale, options, stats, progress)
        pairs = _pairs_table(corpus, corpus, found)
        groups = group_duplicates(corpus, found.a, found.b, options)
        stats["work_bytes"] = sum(p.stat().st_size for p in work.root.rglob("*") if p.is_file())
        if work.reused:
            stats["work"] = dict(work.reused)
    stats.update(pairs=pairs.num_rows, groups=len(set(groups["group_id"].to_pylist())),
                 in_groups=groups.num_rows, seconds=round(time.time() - started, 2))
    result = DedupResult(pairs, groups, stats)
    stats["removed"] = result.removed
    return result


def find_leaks(index: str | Path | Searcher, against: str, options: DedupOptions | None = None,
               progress: bool | None = None, workdir: str | Path | None = None, executor: Executor | None = None,
               keep_work: bool = False, device: str = "cpu", precision: str = "auto") -> DedupResult:
    """Which images of the embeddings directory `against` (e.g. a test set) have a duplicate in
    the index (e.g. the training set). Pairs are (a = against image, b = indexed image).

    On an IVF index the embedding tier runs as partition and join tasks on `executor` (the
    other corpus's rows probe the index's lists, partitions.partitioned_join), the exact and
    phash tiers as hash-bucket tasks over both corpora (hash_tiers.hashed_pairs); then only the
    pairs' rows are read. Other index types search in this process, as before. The same pairs either way."""
    options = options or DedupOptions()
    options.check()
    scale = Scale(None, executor or Executor(), device, precision)
    scale.check()
    if keep_work and workdir is None:  # said before any work (the calibration, the tiers)
        raise ConfigError(NO_PLACE)
    started = time.time()
    searcher = _searcher(index)
    options, chosen = resolve_threshold(searcher, options)
    test = EmbeddingsDir(against)
    changed = test.manifest.identity_changes(searcher.manifest.embeddings)
    if changed:
        raise ConfigError(f"{against} was embedded differently from the index (changed: {', '.join(changed)}): "
                          "embed it with the same config")
    test_parts = test.parts()
    if not test_parts:
        raise ConfigError(f"{against} has no complete parts: run `imgindex embed` first")
    stats: dict = {"against": against, **_tiers(options), **chosen}
    ivf = isinstance(faiss.downcast_index(searcher.index), faiss.IndexIVF)
    with WorkDir(workdir, keep_work, name="imgindex-leaks-work") as work:
        scale.work = work
        if "embedding" in options.methods and not ivf:
            if scale.executor.kind != "local":
                log.warning("a %s index is searched in this process: %s is not used by --against",
                            searcher.manifest.factory, scale.executor.flag)
            train = Corpus.of_index(searcher, work.root, progress)
            queries = Corpus([(test, p) for p in test_parts], test.dim, work.root, progress, name="against")
            found = find_pairs(searcher, queries, train, options, False, stats, progress)
        else:
            queries, train, found = _leaks_at_scale(searcher, scale, test, test_parts, options, stats, progress)
        pairs = _pairs_table(queries, train, found)
        stats.update(images=sum(p.rows for p in test_parts), leaked=int(len(np.unique(found.a))),
                     pairs=pairs.num_rows, seconds=round(time.time() - started, 2))
    return DedupResult(pairs, GROUP_SCHEMA.empty_table(), stats)


def _leaks_at_scale(searcher: Searcher, scale: Scale, test: EmbeddingsDir, test_parts: list, options: DedupOptions,
                    stats: dict, progress: bool | None) -> tuple[Corpus, Corpus, Pairs]:
    """find_pairs's leakage pairs without either corpus's vectors or hashes in this process: every
    tier as tasks, then the rows of the pairs only."""
    candidates = {}
    if {"exact", "phash"} & set(options.methods):
        candidates, stats["hash_partitions"] = hashed_pairs(searcher, scale, options.methods, options.phash_distance,
                                                            progress, against=against_parts(test, test_parts))
    if "embedding" in options.methods:
        rows, rng = tuning_rows(searcher.manifest.count)
        sample = Corpus.of_index(searcher, scale.work.root, False, rows=rows, name="tuning")
        stats["search"] = tune_on(searcher, rows, np.asarray(sample.vectors), rng, options.threshold,
                                  options.max_neighbors)
        q, d, _, capped, stats["partitions"] = partitioned_join(searcher, scale, options.threshold,
                                                                options.max_neighbors, progress,
                                                                against=against_parts(test, test_parts))
        candidates["embedding"] = (q, d)
        note_capped(stats, capped, options.max_neighbors)
    empty = np.zeros(0, np.int64)
    q_rows = np.unique(np.concatenate([empty] + [a for a, _ in candidates.values()]))
    d_rows = np.unique(np.concatenate([empty] + [b for _, b in candidates.values()]))
    queries = Corpus([(test, p) for p in test_parts], test.dim, scale.work.root, progress, name="against",
                     rows=q_rows)
    train = Corpus.of_index(searcher, scale.work.root, progress, rows=d_rows)
    local = {kind: (np.searchsorted(q_rows, a), np.searchsorted(d_rows, b)) for kind, (a, b) in candidates.items()}
    return queries, train, decide(queries, train, local, options, False, stats)
