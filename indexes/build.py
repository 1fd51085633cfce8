"""Embeddings directory -> FAISS index directory, on any executor (this process, `--procs N`,
`--ray N|auto`), with bounded memory and resumable.

The driver plans once: it chooses the index, draws a seeded sample (training vectors and
evaluation queries, reading only the row groups it draws from), trains, and writes the trained
index, the queries and the plan to IDX/_build. Workers then add disjoint runs of parts into
sub-indexes that share the trained quantizer, each with the exact neighbours of the queries among
its vectors (indexes.parallel); the driver merges them in RAM, or into one on-disk file of
inverted lists when they exceed the budget (indexes.ondisk), tunes the search knob to the target
recall and writes everything with the manifest last. A rerun of an interrupted build reuses the
plan, the trained index and every finished sub-index. `add_parts` appends new parts to a trained
index without retraining.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import faiss
import numpy as np
import pyarrow as pa

from imgindex.errors import ConfigError, Corrupt
from imgindex.executors.handout import Event, Outcome, hand_out
from imgindex.executors.placement import Executor, place
from imgindex.formats.embeddings_dir import EmbeddingsDir, Part
from imgindex.formats.index_dir import (BUILD, IDS, IDS_MAPPED, IVFDATA, KEYS, RECALL_SET, BuildDir, IndexDir,
                                       IndexManifest, PartRecord, Segment, c_stdout_to_stderr, data_files,
                                       digest_changes, faiss_reason, index_file, merge_sorted_keys, part_digest,
                                       segment_files, write_lists)
from imgindex.indexes import parallel
from imgindex.indexes.factory import (FLAT_THRESHOLD, MIN_TRAIN_PER_LIST, choose_index_key, codes_bytes, human,
                                      parse_memory, search_knob)
from imgindex.indexes.ondisk import choose_on_disk, merge_to_disk
from imgindex.indexes.reads import sample
from imgindex.indexes.recall import TIE_SLACK, Exact, recall_of_rows, tune
from imgindex.plurals import counted
from imgindex.progress import progress_bar

log = logging.getLogger(__name__)

K = 10
DRIFT_WARNING = 1.5  # new data's mean residual / the training sample's
ON_DISK_MODES = ("auto", "always", "never")


@dataclass
class BuildOptions:
    index_key: str | None = None  # any faiss.index_factory string; None = choose automatically
    max_memory: str = "16G"
    target_recall: float = 0.95
    eval_queries: int = 1000
    train_per_list: int = 50  # training vectors per IVF list wanted (faiss warns below 39)
    max_train: int | None = None  # None: as many as train_per_list asks and the budget holds
    flat_threshold: int = FLAT_THRESHOLD
    seed: int = 0
    on_disk: str = "auto"  # IVF lists on disk: auto (when they exceed max_memory) | always | never


def faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _make_index(key: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"--index-key {key!r} is not a valid faiss.index_factory string ({faiss_reason(exc)})") from None


def _train_size(index: faiss.Index, count: int, dim: int, budget: int, options: BuildOptions) -> tuple[int, str | None]:
    """(training vectors, a note when an IVF index gets fewer than faiss advises a list). The sample
    is held to the memory budget (it is the driver's largest allocation)."""
    if index.is_trained:
        return 0, None
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 256
    want = max(options.train_per_list * nlist, 256 * 40)
    size = min(count, want, max(1, budget // (dim * 4)), options.max_train or count)
    note = None
    if ivf is not None and size < MIN_TRAIN_PER_LIST * nlist:
        why = "the corpus has no more" if size == count else (
            f"--max-memory {human(budget)} holds no more" if size < (options.max_train or count) else "max_train")
        note = (f"training {ivf.nlist:,} lists on {size:,} vectors ({size / nlist:.1f} a list; faiss advises "
                f"{MIN_TRAIN_PER_LIST}): {why}")
    return size, note


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
    if ivf is not None:
        ivf.clustering_index = None


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
    ids, vectors = sample(emb, parts, min(total, count + extra), seed=seed)
    pick = np.sort(np.random.default_rng(seed + 1).choice(len(ids), size=min(count, len(ids)), replace=False))
    return ids[pick], np.ascontiguousarray(vectors[pick]), vectors


def _say(text: str) -> None:
    """A choice made for the user, or a step they should know of, on stderr (also recorded in the manifest)."""
    print(f"imgindex: {text}", file=sys.stderr)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _plan_identity(key: str, parts: list[Part], options: BuildOptions, train_size: int) -> dict:
    """What a finished sub-index depends on: a rerun with the same identity resumes the build."""
    return {"factory": key, "parts": [[p.shard, p.rows] for p in parts], "seed": options.seed,
            "eval_queries": options.eval_queries, "train_size": train_size}


def _start_or_resume(build: BuildDir, emb: EmbeddingsDir, parts: list[Part], index: faiss.Index, identity: dict,
                     workers: int, max_task_rows: int, options: BuildOptions) -> tuple[dict, faiss.Index]:
    """The plan and the trained index: those of an interrupted build of the same identity, else new
    ones (sample, train, split into tasks), written to IDX/_build before any task runs."""
    plan = build.read_json(parallel.PLAN)
    if plan is not None and plan.get("identity") == identity and build.exists(parallel.TRAINED) \
            and build.exists(parallel.QUERIES):
        return plan, build.read_index(parallel.TRAINED)
    if plan is not None:
        _say(f"discarding the unfinished build in {build.url} (made from other parts or options)")
    build.clear()
    build.makedirs()
    count = sum(p.rows for p in parts)
    timings = {}
    t = time.time()
    query_ids, queries, train = _queries(emb, parts, options.eval_queries, identity["train_size"], options.seed)
    timings["sample_s"] = round(time.time() - t, 3)
    t = time.time()
    if not index.is_trained:
        _train(index, train)
    timings["train_s"] = round(time.time() - t, 3)
    residual = mean_residual(index, train)
    del train
    if parallel.mergeable(index):
        tasks = parallel.split_tasks(parts, parallel.rows_per_task(count, workers, max_task_rows))
    else:  # e.g. HNSW: one graph, built by one worker
        tasks = [parallel.AddTask("add-00000", tuple(parts), 0)]
    build.write_index(parallel.TRAINED, index)
    build.write_arrays(parallel.QUERIES, ids=query_ids, vectors=queries)
    plan = {"identity": identity, "tasks": [t.to_json() for t in tasks], "train_residual": residual,
            "timings": timings}
    parallel.save_plan(build, plan)
    return plan, index


def build_index(emb_dir: str, out: str, options: BuildOptions | None = None, overwrite: bool = False,
                progress: bool | None = None, executor: Executor | None = None) -> IndexManifest:
    """Build IDX from every complete part of EMB_DIR on `executor` (default: this process);
    returns the index manifest. Rerun after an interruption, it resumes."""
    options = options or BuildOptions()
    executor = executor or Executor()
    if options.on_disk not in ON_DISK_MODES:
        raise ConfigError(f"--on-disk {options.on_disk!r}: use one of {', '.join(ON_DISK_MODES)}")
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
    on_disk, disk_reason = choose_on_disk(index, count, budget, options.on_disk)
    train_size, train_note = _train_size(index, count, emb.dim, budget, options)
    notes = [n for n in (train_note, disk_reason and f"on-disk lists: {disk_reason}") if n]
    placement = place(executor, _cores(), 0, want_gpu=False)
    workers = placement.workers
    if not parallel.mergeable(index) and executor.kind != "local":
        notes.append(f"{faiss.downcast_index(index).__class__.__name__} cannot be built in parts and merged: "
                     f"one {executor.worker_word} builds it")
    for note in notes:
        _say(note)
    log.info("index %s: %s", key, reason)

    created = not target.path.exists()
    target.path.mkdir(parents=True, exist_ok=True)  # only now: a refused build leaves no folder behind
    target.forget()  # until the new manifest is written, the directory is not an index
    build = BuildDir(target.build_url)
    per_vector = max(1, codes_bytes(index, 1) or emb.dim * 4)
    identity = _plan_identity(key, parts, options, train_size)
    try:
        plan, index = _start_or_resume(build, emb, parts, index, identity, workers,
                                       max(1, budget // (4 * per_vector)), options)
    except ConfigError:  # training refused (e.g. too few vectors for the codes): nothing of this build stays
        if created:
            shutil.rmtree(target.path, ignore_errors=True)
        raise
    tasks = [parallel.AddTask.from_json(t) for t in plan["tasks"]]
    done = parallel.done_tasks(build, tasks)
    if done:
        _say(f"resuming the build in {build.url}: {counted(len(done), 'task')} of {len(tasks)} already done")
    todo = [t for t in tasks if t.name not in done]
    timings = dict(plan["timings"])
    t = time.time()
    outcome = _add(placement, parallel.AddWorkers(emb.location, build.url, K + 1, faiss.try_extract_index_ivf(index)
                                                  is not None), todo, count - sum(t.rows for t in todo), count,
                   progress)
    timings["add_s"] = round(time.time() - t, 3)
    if outcome.failed:
        name, error = next(iter(outcome.failed.items()))
        raise ConfigError(f"{counted(len(outcome.failed), 'task')} of the build failed every attempt (task {name}: "
                          f"{error}); rerun the same command to finish them: the {len(tasks) - len(outcome.failed)} "
                          "done are kept")

    t = time.time()
    exact = parallel.read_exact(build, tasks, K + 1 + TIE_SLACK)
    query_ids = build.read_arrays(parallel.QUERIES)
    queries, query_ids = query_ids["vectors"], query_ids["ids"]
    timings["ground_truth_s"] = round(time.time() - t, 3)
    t = time.time()
    ivfdata_tmp = None
    if on_disk:
        ivfdata_tmp = target.tmp(IVFDATA)
        local = target.path / BUILD  # merge_ondisk maps the sub-indexes: local files (downloaded if remote)
        index = merge_to_disk(index, [build.local_file(f"{task.name}.faiss", local) for task in tasks],
                              str(ivfdata_tmp), str(target.path / IVFDATA))
    else:
        index = parallel.merge_in_memory(build, tasks)
    ids_tmp = target.tmp(IDS)
    parallel.concat_ids(build, tasks, ids_tmp, target.tmp(IDS_MAPPED))
    merge_sorted_keys(parallel.key_runs(build, tasks), target.tmp(KEYS))  # memory bounded by the runs' blocks
    timings["merge_s"] = round(time.time() - t, 3)
    if index.ntotal != count:
        raise ConfigError(f"the merged index holds {index.ntotal:,} vectors, the parts {count:,}: a part changed "
                          "during the build; rerun with --overwrite")

    t = time.time()
    knob = search_knob(index)
    value, recall, curve = tune(index, knob, queries, query_ids, exact, options.target_recall, K)
    timings["tune_s"] = round(time.time() - t, 3)
    manifest = IndexManifest(
        embeddings_dir=emb.location,
        embeddings=emb.manifest,
        factory=key,
        selection=reason,
        notes=notes,
        on_disk=on_disk,
        mapped_ids=True,
        metric="inner_product",
        normalized=True,
        count=int(index.ntotal),
        dim=emb.dim,
        build={**asdict(options), "train_size": train_size,
               "executor": {"kind": executor.kind, "asked": executor.flag, "workers": workers,
                            "tasks": len(tasks), "resumed_tasks": len(done), "retried": outcome.retried,
                            "restarts": outcome.restarts}},
        parts=_part_records(emb, parts),
        **measured_recall(knob, value, recall, curve, len(query_ids)),
        recall_set=RECALL_SET,
        recall_covers=_covers(len(query_ids), count),
        train_residual=plan["train_residual"],
        faiss_gpus=faiss_gpus(),
        versions=_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        adds=[],
        timings=timings,
    )
    t = time.time()
    target.write_data(index, ids_tmp, ivfdata_tmp, on_disk=on_disk)
    target.place_lookups()
    target.write_recall_set(RECALL_SET, ids=query_ids, vectors=queries, scores=exact.scores, exact=exact.ids)
    timings["write_s"] = round(time.time() - t, 3)
    timings["total_s"] = round(time.time() - started, 3)
    target.record_files(manifest)
    target.write_manifest(manifest)
    del index
    build.clear()
    if target.remote:  # the staging copy keeps the index files (the cache searches map), not the build's
        shutil.rmtree(target.path / BUILD, ignore_errors=True)
    return manifest


def _part_records(emb: EmbeddingsDir, parts: list[Part]) -> list[PartRecord]:
    """The manifest's record of each part: shard, rows, directory and a digest (local or remote)."""
    return [PartRecord(shard=p.shard, rows=p.rows, dir=emb.location, file=part_digest(emb.fs, p.path, emb.local))
            for p in parts]


def _add(placement, factory: parallel.AddWorkers, todo: list[parallel.AddTask], already: int, count: int,
         progress: bool | None) -> Outcome:
    """Hand the tasks out on the placement's pool, with one bar counted in vectors."""
    executor = placement.executor
    if not todo:
        return Outcome()
    pool = placement.pool(factory, label="IndexAdd", threads=placement.cores)
    bar = progress_bar(total=count, initial=already, unit="vec", desc="index", progress=progress)
    if pool.reports_progress:
        pool.progress = lambda vectors, _: bar.update(vectors)

    def on_event(event: Event, outcome: Outcome) -> None:
        if event.kind == "done" and not pool.reports_progress:
            bar.update(event.result["rows"])
        executor.warn(event, outcome, "task")

    try:
        return hand_out(pool, todo, min(placement.workers, len(todo)), executor.retries, on_event)
    finally:
        bar.close()


def measured_recall(knob: str | None, value: int | None, recall: float, curve: list[dict], queries: int) -> dict:
    """The index manifest's recall fields, as a build and every --add record them."""
    return {f"recall_at_{K}": round(recall, 4), "recall_queries": int(queries),
            "search_params": {knob: value} if knob else {}, "recall_curve": curve}


def _covers(queries: int, count: int) -> str:
    """What the manifest's recall figure measures, in words."""
    return (f"{queries:,} queries drawn from the parts the index was built from, against their exact neighbours "
            f"among all {count:,} vectors")


def add_parts(emb_dir: str, index_dir: str, target_recall: float | None = None, eval_queries: int = 1000,
              progress: bool | None = None, executor: Executor | None = None) -> tuple[IndexManifest, int]:
    """Add the parts of EMB_DIR that the index does not hold yet, without retraining, at the cost of
    what it adds: only the new parts are read (by the build's add tasks, on `executor`), and the
    index's files stay as they are but for an index held in RAM (written again, whole).

    The new rows become a segment: their ids and sorted keys in files of their own and, for lists
    on disk, their inverted lists in a file of their own, stacked on the others when the index
    loads. Recall is re-measured on the build's queries, whose exact neighbours (kept in the index)
    are brought up to date from the new vectors alone, and of those neighbours, the new vectors'
    share that the search finds (are the new vectors found when they are the answer). Warns when the new vectors sit much further from the IVF
    centroids than the training sample did (rebuild then). Returns (updated manifest, vectors added).
    An interrupted --add leaves the index as it was; rerun, it resumes from its finished tasks.
    """
    started = time.time()
    executor = executor or Executor()
    target = IndexDir(index_dir)
    manifest = target.read_manifest()
    emb = EmbeddingsDir(emb_dir)
    changed = emb.manifest.identity_changes(manifest.embeddings)
    if changed:
        raise ConfigError(f"{emb_dir} was embedded differently from the index at {index_dir} (changed: "
                          f"{', '.join(changed)}): embed with the same config, or build a new index")
    if not manifest.recall_set or not manifest.mapped_ids:
        raise ConfigError(f"the index at {index_dir} was built before indexes kept their recall queries and mapped "
                          f"ids, which --add extends without reading the old parts: rebuild it once with "
                          f"`imgindex index EMB_DIR --out {index_dir} --overwrite`")
    known = {p.shard: p for p in manifest.parts}
    parts = emb.parts()
    changed = [p.shard for p in parts if p.shard in known and p.rows != known[p.shard].rows]
    if changed:
        log.warning("%d shards changed since they were indexed (e.g. %s): rebuild the index to pick them up",
                    len(changed), changed[0])
    new = [p for p in parts if p.shard not in known]
    count = sum(p.rows for p in new)
    if not count:
        return manifest, 0

    on_disk = manifest.on_disk
    old_count = manifest.count
    segment = len(manifest.segments) + 1
    index = target.load_index(manifest, mmap=on_disk)  # on disk: the lists stay mapped; in RAM: written again
    recall_set = target.read_recall_set(manifest)
    placement = place(executor, _cores(), 0, want_gpu=False)
    seed = int(manifest.build.get("seed", 0)) + segment
    build = BuildDir(target.build_url)
    identity = {"add_to": old_count, "segment": segment, "parts": [[p.shard, p.rows] for p in new],
                "eval_queries": eval_queries, "seed": seed}
    plan = build.read_json(parallel.PLAN)
    _, new_sample = sample(emb, new, min(eval_queries, count), seed=seed)  # where the new vectors sit (drift)
    if plan is not None and plan.get("identity") == identity and build.exists(parallel.TRAINED) \
            and build.exists(parallel.QUERIES):
        tasks = [parallel.AddTask.from_json(t) for t in plan["tasks"]]
    else:
        build.clear()
        build.makedirs()
        if parallel.mergeable(index):  # sub-indexes of the new parts that share the trained quantizer
            build.write_index(parallel.TRAINED, _emptied(target, manifest, index))
            per_vector = max(1, codes_bytes(index, 1) or index.d * 4)
            size = parallel.rows_per_task(count, placement.workers,
                                          max(1, parse_memory(manifest.build["max_memory"]) // (4 * per_vector)))
            tasks = [replace(t, start=t.start + old_count) for t in parallel.split_tasks(new, size)]
        else:  # e.g. HNSW: one graph, the new vectors added to it by one worker
            build.write_index(parallel.TRAINED, index)
            tasks = [parallel.AddTask("add-00000", tuple(new), old_count)]
        build.write_arrays(parallel.QUERIES, ids=recall_set["ids"], vectors=recall_set["vectors"].astype(np.float32))
        parallel.save_plan(build, {"identity": identity, "tasks": [t.to_json() for t in tasks]})
    done = parallel.done_tasks(build, tasks)
    todo = [t for t in tasks if t.name not in done]
    ivf = faiss.try_extract_index_ivf(index)
    outcome = _add(placement, parallel.AddWorkers(emb.location, build.url, K + 1, ivf is not None), todo,
                   count - sum(t.rows for t in todo), count, progress)
    if outcome.failed:
        name, error = next(iter(outcome.failed.items()))
        raise ConfigError(f"{counted(len(outcome.failed), 'task')} of the --add failed every attempt (task {name}: "
                          f"{error}); rerun the same command to finish them: the index is as it was")

    drift = None
    residual = mean_residual(index, new_sample)
    if manifest.train_residual and residual is not None:
        drift = round(residual / manifest.train_residual, 3)
        if drift > DRIFT_WARNING:
            log.warning("the new vectors are %.1fx further from the index's centroids than its training sample: "
                        "the data drifted; rebuild with `imgindex index EMB_DIR --out %s --overwrite`",
                        drift, index_dir)
    depth = K + 1 + TIE_SLACK
    among_new = parallel.read_exact(build, tasks, depth)
    held = len(recall_set["ids"])
    exact = parallel.merge_exact([Exact(recall_set["scores"], recall_set["exact"]), among_new], depth)

    files = segment_files(segment, lists=on_disk)
    parallel.concat_ids(build, tasks, None, target.path / files["ids"])  # the new rows only
    merge_sorted_keys(parallel.key_runs(build, tasks), target.path / files["keys"])
    old_files = set(data_files(manifest))
    manifest = IndexManifest.from_json(manifest.to_json(), index_dir)  # the one read stays as it was until the new one is written
    written = list(files.values())
    if on_disk:  # the new lists in a file of their own; index.faiss and index.ivfdata stay as they are
        subs = [build.local_file(f"{t.name}.faiss", target.path / BUILD) for t in tasks]
        lists = merge_to_disk(_emptied(target, manifest, index), subs,
                              str(target.tmp(files["ivfdata"])), str(target.path / files["ivfdata"]))
        os.replace(target.tmp(files["ivfdata"]), target.path / files["ivfdata"])
        write_lists(faiss.extract_index_ivf(lists).invlists, target.tmp(files["lists"]))
        os.replace(target.tmp(files["lists"]), target.path / files["lists"])
        del lists
    else:  # in RAM: the index is written again (it fits RAM), under a new name until the manifest names it
        if parallel.mergeable(index):
            parallel.merge_into(index, build, tasks)
        else:
            index = build.read_index(f"{tasks[0].name}.faiss")
        manifest.index_file = f"index.{segment}.faiss"
        faiss.write_index(index, str(target.tmp(manifest.index_file)))
        os.replace(target.tmp(manifest.index_file), target.path / manifest.index_file)
        written.append(manifest.index_file)
    manifest.segments = [*manifest.segments, Segment(rows=count, files=files)]
    manifest.count = old_count + count
    manifest.parts += _part_records(emb, new)
    if on_disk:
        target.record_files(manifest, changed=tuple(written))
        index = target.load_index(manifest)  # the stacked lists, as searches will load them
    if index.ntotal != manifest.count:
        raise ConfigError(f"the index holds {index.ntotal:,} vectors after the --add, {manifest.count:,} were "
                          "expected: a part changed during the --add; rerun it")

    knob = search_knob(index)
    value, recall, curve = tune(index, knob, recall_set["vectors"], recall_set["ids"], exact,
                                target_recall or manifest.build["target_recall"], K)
    _, found = index.search(recall_set["vectors"], K + 1)  # at the setting tune chose
    of_new, slots = recall_of_rows(found, exact, recall_set["ids"], old_count, manifest.count, K)
    manifest.recall_set = f"recall.{segment}.npz"
    target.write_recall_set(manifest.recall_set, ids=recall_set["ids"], vectors=recall_set["vectors"],
                            scores=exact.scores, exact=exact.ids)
    written.append(manifest.recall_set)
    for field, measured in measured_recall(knob, value, recall, curve, held).items():
        setattr(manifest, field, measured)
    manifest.recall_covers = _covers(held, manifest.count)
    manifest.adds.append({
        "vectors": count, "parts": len(new), "segment": segment, "drift_ratio": drift,
        f"recall_at_{K}_of_new": None if of_new is None else round(of_new, 4),
        "of_new_covers": (f"the {slots:,} of the {held:,} queries' exact top-{K} neighbours (among all "
                          f"{manifest.count:,} vectors) that are new vectors: the share of them the search returns"),
        "executor": {"kind": executor.kind, "asked": executor.flag, "workers": placement.workers,
                     "tasks": len(tasks), "resumed_tasks": len(done), "retried": outcome.retried},
        "seconds": round(time.time() - started, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    target.record_files(manifest, changed=tuple(written))
    target.write_manifest(manifest, changed=tuple(written))
    target.remove(sorted(old_files - set(data_files(manifest))))  # the replaced index file and recall set
    del index
    build.clear()
    if target.remote:
        shutil.rmtree(target.path / BUILD, ignore_errors=True)
    return manifest, count


def _emptied(target: IndexDir, manifest: IndexManifest, index: faiss.Index) -> faiss.Index:
    """The index's trained structure without its vectors (an IVF index's lists are not read)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:  # flat codes, held in RAM
        empty = faiss.clone_index(index)
        empty.reset()
        return empty
    flags = faiss.IO_FLAG_SKIP_IVF_DATA if manifest.on_disk else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    with c_stdout_to_stderr():
        empty = faiss.read_index(str(target.path / index_file(manifest)), flags)
    ivf = faiss.extract_index_ivf(empty)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    lists.this.disown()  # the index owns them
    ivf.replace_invlists(lists, True)
    ivf.ntotal = empty.ntotal = 0
    return empty


def _by_dir(manifest: IndexManifest) -> list[tuple[str, list[PartRecord]]]:
    """The index's parts grouped by the embeddings directory that holds them, in index order."""
    groups: list[tuple[str, list[PartRecord]]] = []
    for part in manifest.parts:
        where = part.dir
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
            part = emb.part(recorded.shard, recorded.rows)
            if not recorded.file:
                raise ConfigError(f"the index records no digest of the part of shard {part.shard} in {where} (built "
                                  "before remote parts had one), so it cannot be checked: rebuild the index")
            found = part_digest(emb.fs, part.path, emb.local)
            if "sha256" in recorded.file and emb.local:  # recorded whole by older builds: checked whole
                from imgindex.formats.index_dir import file_digest
                found = file_digest(Path(part.path), full=True)
            if digest_changes(recorded.file, found):
                raise Corrupt(f"the part of shard {part.shard} in {where} changed since it was indexed "
                                  f"({', '.join(digest_changes(recorded.file, found))} differ): rebuild the index")
            checked += 1
    return {"files": len(manifest.files), "parts": checked}
