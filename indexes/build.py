"""Embeddings directory -> FAISS index directory, streaming the parts with bounded memory.

Pass 1 draws a seeded sample (training vectors and evaluation queries); pass 2 adds every
part in batches and, over the same blocks, computes the queries' exact neighbours. Then
the search knob is tuned to the target recall, and everything is written with the
manifest last. `add_parts` appends new parts to a trained index without retraining.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.progress import progress_bar
from imgindex.formats.embeddings_dir import EmbeddingsDir, Part
from imgindex.indexes.factory import FLAT_THRESHOLD, choose_index_key, parse_memory, search_knob
from imgindex.formats.index_dir import FORMAT, IDS, IDS_SCHEMA, IndexDir, faiss_reason
from imgindex.indexes.recall import exact_neighbors, tune
from imgindex.errors import ConfigError
from imgindex.formats.embeddings_dir import identity_changes

log = logging.getLogger(__name__)

K = 10
DRIFT_WARNING = 1.5  # new data's mean residual / the training sample's


@dataclass
class BuildOptions:
    index_key: str | None = None  # any faiss.index_factory string; None = choose automatically
    max_memory: str = "16G"
    target_recall: float = 0.95
    eval_queries: int = 1000
    train_per_list: int = 50  # training vectors per IVF list (faiss wants >= 39)
    max_train: int = 1_000_000
    flat_threshold: int = FLAT_THRESHOLD
    seed: int = 0


def faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _make_index(key: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"--index-key {key!r} is not a valid faiss.index_factory string ({faiss_reason(exc)})") from None


def _train_size(index: faiss.Index, count: int, options: BuildOptions) -> int:
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 256
    want = max(options.train_per_list * nlist, 256 * 40)
    return min(count, want, options.max_train)


def _check_trainable(index: faiss.Index, key: str, count: int) -> None:
    """An IVF index needs at least one training vector per list (faiss stops with a traceback)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and not index.is_trained and ivf.nlist > count:
        raise ConfigError(f"--index-key {key!r} has {ivf.nlist:,} lists for {count:,} vectors (k-means needs at "
                          "least one vector a list, faiss advises 39): use fewer lists, or leave out --index-key")


def _train(index: faiss.Index, vectors: np.ndarray) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    gpus = faiss_gpus()
    if gpus and ivf is not None:  # k-means on the GPU(s); the trained index stays on the CPU
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    try:
        index.train(vectors)
    except RuntimeError as exc:  # e.g. PQ codes with fewer vectors than centroids
        raise ConfigError(f"cannot train {faiss.downcast_index(index).__class__.__name__} on {len(vectors):,} "
                          f"vectors ({faiss_reason(exc)}): choose another --index-key, or leave it out") from None


def mean_residual(index: faiss.Index, vectors: np.ndarray) -> float | None:
    """Mean squared distance to the nearest IVF centroid; None for indexes without a quantizer."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not len(vectors):
        return None
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    flat = faiss.IndexFlatL2(ivf.d)
    flat.add(centroids)
    if isinstance(index, faiss.IndexPreTransform):  # e.g. OPQ: centroids live in the rotated space
        for i in range(index.chain.size()):
            vectors = faiss.downcast_VectorTransform(index.chain.at(i)).apply(vectors)
    distances, _ = flat.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return float(distances.mean())


def _versions() -> dict:
    return {"faiss": faiss.__version__, "pyarrow": pa.__version__, "python": platform.python_version()}


def _queries(emb: EmbeddingsDir, parts: list[Part], count: int, extra: int, seed: int):
    """Seeded sample of count+extra rows; returns (query ids, query vectors, training vectors)."""
    total = sum(p.rows for p in parts)
    ids, vectors = emb.sample(parts, min(total, count + extra), seed=seed)
    pick = np.sort(np.random.default_rng(seed + 1).choice(len(ids), size=min(count, len(ids)), replace=False))
    return ids[pick], np.ascontiguousarray(vectors[pick]), vectors


def build_index(emb_dir: str, out: str, options: BuildOptions | None = None, overwrite: bool = False,
                progress: bool | None = None) -> dict:
    """Build IDX from every complete part of EMB_DIR; returns the index manifest."""
    options = options or BuildOptions()
    started = time.time()
    emb = EmbeddingsDir(emb_dir)
    parts = emb.parts()
    count = sum(p.rows for p in parts)
    if not count:
        raise ConfigError(f"{emb_dir} has no complete parts with rows: run or finish `imgindex embed` first")
    target = IndexDir(out)
    if target.exists() and not overwrite:
        raise ConfigError(f"{out} already holds an index: use --overwrite to replace it, or --add to extend it")
    budget = parse_memory(options.max_memory)
    if options.index_key:
        key, reason = options.index_key, "given with --index-key"
    else:
        key, reason = choose_index_key(count, emb.dim, budget, options.flat_threshold)
    index = _make_index(key, emb.dim)
    _check_trainable(index, key, count)
    log.info("index %s: %s", key, reason)

    timings = {}
    t = time.time()
    train_size = _train_size(index, count, options)
    query_ids, queries, train = _queries(emb, parts, options.eval_queries, train_size, options.seed)
    timings["sample_s"] = round(time.time() - t, 3)
    t = time.time()
    if not index.is_trained:
        _train(index, train)
    timings["train_s"] = round(time.time() - t, 3)
    residual = mean_residual(index, train)
    del train
    target.path.mkdir(parents=True, exist_ok=True)  # only now: a refused build leaves no folder behind
    target.forget()  # until the new manifest is written, the directory is not an index

    ids_tmp = target.tmp(IDS)
    add_seconds = 0.0
    bar = progress_bar(total=count, unit="vec", desc="index", progress=progress)
    with pq.ParquetWriter(ids_tmp, IDS_SCHEMA) as ids_writer:
        def blocks():
            nonlocal add_seconds
            for _, ids, vectors in emb.iter_batches(parts):
                t_add = time.time()
                index.add(vectors)
                add_seconds += time.time() - t_add
                ids_writer.write_table(ids.cast(IDS_SCHEMA))
                bar.update(len(vectors))
                yield vectors

        t = time.time()
        exact = exact_neighbors(queries, blocks(), K + 1)
        timings["add_s"] = round(add_seconds, 3)
        timings["ground_truth_s"] = round(time.time() - t - add_seconds, 3)
    bar.close()

    t = time.time()
    knob = search_knob(index)
    value, recall, curve = tune(index, knob, queries, query_ids, exact, options.target_recall, K)
    timings["tune_s"] = round(time.time() - t, 3)
    manifest = {
        "format": FORMAT,
        "embeddings_dir": emb.location,
        "embeddings": emb.manifest,
        "factory": key,
        "selection": reason,
        "metric": "inner_product",
        "normalized": True,
        "count": int(index.ntotal),
        "dim": emb.dim,
        "build": {**asdict(options), "train_size": train_size},
        "parts": [{"shard": p.shard, "rows": p.rows, "dir": emb.location, "file": emb.digest(p)} for p in parts],
        **measured_recall(knob, value, recall, curve, len(query_ids)),
        "train_residual": residual,
        "faiss_gpus": faiss_gpus(),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "adds": [],
        "timings": timings,
    }
    t = time.time()
    target.write_data(index, ids_tmp)
    timings["write_s"] = round(time.time() - t, 3)
    timings["total_s"] = round(time.time() - started, 3)
    target.record_files(manifest)
    target.write_manifest(manifest)
    return manifest


def measured_recall(knob: str | None, value: int | None, recall: float, curve: list[dict], queries: int) -> dict:
    """The index manifest's recall fields, as a build and every --add record them."""
    return {f"recall_at_{K}": round(recall, 4), "recall_queries": int(queries),
            "search_params": {knob: value} if knob else {}, "recall_curve": curve}


def _blocks(sources: list[tuple[EmbeddingsDir, list[Part]]]):
    for emb, parts in sources:
        for _, _, vectors in emb.iter_batches(parts):
            yield vectors


def add_parts(emb_dir: str, index_dir: str, target_recall: float | None = None,
              eval_queries: int = 1000, progress: bool | None = None) -> tuple[dict, int]:
    """Add the parts of EMB_DIR that the index does not hold yet, without retraining.

    Warns when the new vectors sit much further from the IVF centroids than the training
    sample did (the index was trained on different data: rebuild it), re-measures recall on
    queries drawn from the new parts, and returns (updated manifest, vectors added).
    """
    started = time.time()
    target = IndexDir(index_dir)
    manifest = target.read_manifest()
    index = target.load_index(manifest, mmap=False)
    emb = EmbeddingsDir(emb_dir)
    changed = identity_changes(emb.manifest, manifest["embeddings"])
    if changed:
        raise ConfigError(f"{emb_dir} was embedded differently from the index at {index_dir} (changed: "
                          f"{', '.join(changed)}): embed with the same config, or build a new index")
    known = {p["shard"]: p for p in manifest["parts"]}
    changed = [p.shard for p in emb.parts() if p.shard in known and p.rows != known[p.shard]["rows"]]
    if changed:
        log.warning("%d shards changed since they were indexed (e.g. %s): rebuild the index to pick them up",
                    len(changed), changed[0])
    new = [p for p in emb.parts() if p.shard not in known]
    if not new:
        return manifest, 0

    old_ids = target.read_ids(manifest)
    ids_tmp = target.tmp(IDS)
    count = sum(p.rows for p in new)
    residual_sum, added = 0.0, 0
    bar = progress_bar(total=count, unit="vec", desc="add", progress=progress)
    with pq.ParquetWriter(ids_tmp, IDS_SCHEMA) as ids_writer:
        ids_writer.write_table(old_ids)
        for _, ids, vectors in emb.iter_batches(new):
            residual = mean_residual(index, vectors)
            residual_sum += (residual or 0.0) * len(vectors)
            index.add(vectors)
            ids_writer.write_table(ids.cast(IDS_SCHEMA))
            added += len(vectors)
            bar.update(len(vectors))
    bar.close()
    drift = None
    if manifest.get("train_residual"):
        drift = round(residual_sum / added / manifest["train_residual"], 3)
        if drift > DRIFT_WARNING:
            log.warning("the new vectors are %.1fx further from the index's centroids than its training sample: "
                        "the data drifted; rebuild with `imgindex index EMB_DIR --out %s --overwrite`",
                        drift, index_dir)

    old_count = int(manifest["count"])
    sources = []
    for where, group in _by_dir(manifest):
        old = EmbeddingsDir(where)
        sources.append((old, [old.part(p["shard"], p["rows"]) for p in group]))
    sources.append((emb, new))
    query_ids, queries = emb.sample(new, eval_queries, seed=manifest["build"].get("seed", 0))
    query_ids = query_ids + old_count
    exact = exact_neighbors(queries, _blocks(sources), K + 1)
    knob = search_knob(index)
    value, recall, curve = tune(index, knob, queries, query_ids, exact,
                                target_recall or manifest["build"]["target_recall"], K)
    manifest["parts"] += [{"shard": p.shard, "rows": p.rows, "dir": emb.location, "file": emb.digest(p)} for p in new]
    manifest["count"] = int(index.ntotal)
    manifest.update(measured_recall(knob, value, recall, curve, len(query_ids)))
    manifest["adds"].append({"vectors": added, "parts": len(new), "drift_ratio": drift,
                             f"recall_at_{K}_on_new": round(recall, 4), "seconds": round(time.time() - started, 3),
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    target.write_data(index, ids_tmp)
    target.record_files(manifest)
    target.write_manifest(manifest)
    return manifest, added


def _by_dir(manifest: dict) -> list[tuple[str, list[dict]]]:
    """The index's parts grouped by the embeddings directory that holds them, in index order."""
    groups: list[tuple[str, list[dict]]] = []
    for part in manifest["parts"]:
        where = part["dir"]
        if groups and groups[-1][0] == where:
            groups[-1][1].append(part)
        else:
            groups.append((where, [part]))
    return groups


def verify_index(index_dir: str) -> dict:
    """Every byte of the index's files, and every part it was built from, against the digests its
    manifest records (`imgindex index --verify`); raises ConfigError naming the first mismatch."""
    target = IndexDir(index_dir)
    manifest = target.read_manifest()
    target.verify(manifest, full=True)
    checked = 0
    for where, group in _by_dir(manifest):
        emb = EmbeddingsDir(where)
        for recorded in group:
            part = emb.part(recorded["shard"], recorded["rows"])
            found = emb.digest(part)
            if recorded.get("file") and found and found["sha256"] != recorded["file"]["sha256"]:
                raise ConfigError(f"the part of shard {part.shard} in {where} changed since it was indexed: "
                                  "rebuild the index")
            checked += 1
    return {"files": len(manifest.get("files") or {}), "parts": checked}
