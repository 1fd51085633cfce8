"""The index built by several workers: `--procs` and `--ray` answer as the one-process build does,
a worker killed in the middle of a task has that task redone elsewhere, an interrupted build
resumes from the sub-indexes that are done, and lists kept on disk answer as lists in RAM.
Tests signal only processes they started; the Ray test joins the test cluster of test_executors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from imgindex.executors.placement import Executor
from imgindex.indexes import build as build_module
from imgindex.indexes import parallel
from imgindex.indexes.build import BuildOptions, build_index
from imgindex.indexes.query import Searcher
from synthetic import clustered_vectors, write_embeddings_dir
from test_executors import ray_cluster  # noqa: F401  (the one Ray test cluster, on loopback)

CLI = [sys.executable, "-m", "imgindex"]
IVF_FLAT = BuildOptions(index_key="IVF64,Flat")  # as the command line builds it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12,000 clustered vectors in 12 parts, and their one-process IVF-Flat index (the reference)."""
    root = tmp_path_factory.mktemp("parallel")
    vectors = clustered_vectors(12_000, 32, clusters=150, spread=1.0, seed=11)
    write_embeddings_dir(str(root / "emb"), vectors, shard_size=1_000)
    build_index(str(root / "emb"), str(root / "one"), IVF_FLAT, progress=False)
    return root, vectors


def assert_same_answers(ours: Path, reference: Path, vectors: np.ndarray) -> None:
    """Same count, recall and tuned nprobe; every query finds the same (shard, key) hits at the same scores."""
    a, b = Searcher(ours), Searcher(reference)
    assert a.manifest.count == b.manifest.count == len(vectors)
    assert a.manifest.recall_at_10 == b.manifest.recall_at_10
    assert a.manifest.search_params == b.manifest.search_params
    queries = vectors[np.random.default_rng(5).choice(len(vectors), 200, replace=False)]
    ha, hb = a.search(queries, k=10).to_pydict(), b.search(queries, k=10).to_pydict()
    np.testing.assert_allclose(ha["score"], hb["score"], atol=1e-5)
    for q in range(len(queries)):
        mine = {(s, k) for i, s, k in zip(ha["query"], ha["shard"], ha["key"]) if i == q}
        theirs = {(s, k) for i, s, k in zip(hb["query"], hb["shard"], hb["key"]) if i == q}
        assert mine == theirs and len(mine) == 10


def test_procs_build_answers_as_the_one_process_build(corpus, tmp_path):
    root, vectors = corpus
    out = tmp_path / "procs"
    done = subprocess.run(CLI + ["index", str(root / "emb"), "--out", str(out), "--index-key", "IVF64,Flat",
                                 "--procs", "2", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "by 2 processes (--procs 2)" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["executor"]["kind"] == "procs" and manifest["build"]["executor"]["workers"] == 2
    assert manifest["build"]["executor"]["tasks"] > 2
    assert not (out / "_build").exists()  # the sub-indexes are gone once merged
    assert_same_answers(out, root / "one", vectors)


def test_ray_build_answers_as_the_one_process_build(corpus, ray_cluster, tmp_path):  # noqa: F811
    root, vectors = corpus
    out = tmp_path / "ray"
    done = subprocess.run(CLI + ["index", str(root / "emb"), "--out", str(out), "--index-key", "IVF64,Flat",
                                 "--ray", "2", "--no-progress"], capture_output=True, text=True,
                          env=ray_cluster.env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "by 2 Ray actors (--ray 2)" in done.stdout
    assert json.loads((out / "manifest.json").read_text())["build"]["executor"]["kind"] == "ray"
    assert_same_answers(out, root / "one", vectors)


@dataclass(frozen=True)
class DyingAddWorkers(parallel.AddWorkers):
    """Workers whose process is SIGKILLed in the middle of one task's first attempt, after that
    task's sub-index was written but before it was marked done (it leaves a half-finished task)."""

    victim: str = "add-00001"

    def __call__(self, slot: int, name: str):
        worker = super().__call__(slot, name)
        run, flag = worker.run, Path(self.build_url) / f"killed-{self.victim}"

        def dying_run(task, progress=None):
            if task.name == self.victim and not flag.exists():
                flag.write_text(name)
                worker.build.write_index(f"{task.name}.faiss", worker.trained)  # a stale, wrong sub-index
                os.kill(os.getpid(), signal.SIGKILL)
            return run(task, progress)

        worker.run = dying_run
        return worker


def test_a_worker_killed_in_the_middle_of_a_task_has_it_redone_elsewhere(corpus, tmp_path, monkeypatch, capfd):
    root, vectors = corpus
    out = tmp_path / "killed"
    monkeypatch.setattr(parallel, "AddWorkers", DyingAddWorkers)
    manifest = build_index(str(root / "emb"), str(out), IVF_FLAT, progress=False,
                           executor=Executor.from_flags(procs=2, retries=2))
    run = manifest.build["executor"]
    assert run["retried"] == 1  # (the dead slot is restarted only if work is left when it is seen dead)
    assert "exited with code -9" in capfd.readouterr().err  # the death was seen and said
    assert_same_answers(out, root / "one", vectors)


def test_an_interrupted_build_resumes_from_the_finished_sub_indexes(corpus, tmp_path, monkeypatch):
    root, vectors = corpus
    out = tmp_path / "resumed"
    real = build_module.hand_out

    def interrupted(pool, tasks, workers, retries, on_event=None):
        finished = []

        def stop_after_three(event, outcome):
            on_event(event, outcome)
            finished.extend([event.shard] if event.kind == "done" else [])
            if len(finished) == 3:
                raise KeyboardInterrupt

        return real(pool, tasks, workers, retries, stop_after_three)

    monkeypatch.setattr(build_module, "hand_out", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(str(root / "emb"), str(out), IVF_FLAT, progress=False)
    assert not (out / "manifest.json").exists()
    assert len(list((out / "_build").glob("add-*.json"))) == 3
    monkeypatch.setattr(build_module, "hand_out", real)
    trained = (out / "_build" / "trained.faiss").stat().st_mtime_ns
    seen = []
    monkeypatch.setattr(build_module, "_train", lambda index, vectors: seen.append(len(vectors)))
    manifest = build_index(str(root / "emb"), str(out), IVF_FLAT, progress=False)
    assert not seen  # not trained again: the first run's trained index is reused
    assert manifest.build["executor"]["resumed_tasks"] == 3
    assert (out / "_build").exists() is False and trained
    assert_same_answers(out, root / "one", vectors)


def test_a_build_of_other_parts_does_not_resume_an_unfinished_one(corpus, tmp_path, monkeypatch, capfd):
    root, vectors = corpus
    out = tmp_path / "other"
    monkeypatch.setattr(build_module, "hand_out", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        build_index(str(root / "emb"), str(out), IVF_FLAT, progress=False)
    monkeypatch.undo()
    fewer = tmp_path / "fewer"
    write_embeddings_dir(str(fewer), vectors[:6_000], shard_size=1_000)
    manifest = build_index(str(fewer), str(out), IVF_FLAT, progress=False)
    assert "discarding the unfinished build" in capfd.readouterr().err
    assert manifest.count == 6_000 and manifest.build["executor"]["resumed_tasks"] == 0


def test_lists_on_disk_answer_as_lists_in_ram_and_are_found_where_the_index_moved(corpus, tmp_path):
    root, vectors = corpus
    built = tmp_path / "disk"
    options = BuildOptions(index_key="IVF64,Flat", on_disk="always")
    manifest = build_index(str(root / "emb"), str(built), options, progress=False)
    assert manifest.on_disk and "index.ivfdata" in manifest.files
    assert (built / "index.ivfdata").stat().st_size > vectors.nbytes  # the vectors are in the lists file
    assert (built / "index.faiss").stat().st_size < vectors.nbytes / 10  # the index file: the quantizer
    moved = tmp_path / "moved"
    built.rename(moved)
    assert_same_answers(moved, root / "one", vectors)


def test_lists_go_on_disk_by_themselves_when_they_exceed_the_budget(corpus, tmp_path, capfd):
    root, vectors = corpus
    manifest = build_index(str(root / "emb"), str(tmp_path / "auto"),
                           BuildOptions(index_key="IVF64,Flat", max_memory="1.5M"), progress=False)
    assert manifest.on_disk and any("exceed --max-memory" in n for n in manifest.notes)
    assert "on-disk lists: its inverted lists" in capfd.readouterr().err
    assert_same_answers(tmp_path / "auto", root / "one", vectors)


def test_the_training_sample_reads_only_the_row_groups_it_draws_from(tmp_path, monkeypatch):
    """Before, every vector of every part was read to draw a sample: at 1B, a full pass over the parts."""
    from imgindex.formats.embeddings_dir import EmbeddingsDir
    from imgindex.indexes import reads

    vectors = clustered_vectors(40_000, 16, clusters=50, seed=2)
    write_embeddings_dir(str(tmp_path / "emb"), vectors, shard_size=1_000)  # 40 parts of one row group
    emb = EmbeddingsDir(str(tmp_path / "emb"))
    opened = []
    real = reads._read
    monkeypatch.setattr(reads, "_read", lambda *a: opened.append(a[1].shard) or real(*a))
    rows, got = reads.sample(emb, emb.parts(), 500, seed=4)
    assert len(set(rows.tolist())) == 500 and len(set(opened)) <= 5  # 8 x 500 rows: about 4 parts of 40
    np.testing.assert_array_equal(got, vectors[rows])
    opened.clear()
    rows, got = reads.sample(emb, emb.parts(), 10_000, seed=4)  # a sample of a quarter draws from every part
    assert len(set(opened)) == 40 and len(rows) == 10_000
    np.testing.assert_array_equal(got, vectors[rows])


def test_ids_are_memory_mapped_and_a_key_is_found_by_binary_search(tmp_path):
    """Before, ids.parquet was read whole into RAM (25 GB at 1B) and a key lookup scanned it."""
    import pyarrow as pa

    from imgindex.errors import ConfigError

    vectors = clustered_vectors(6_000, 16, clusters=30, seed=8)
    write_embeddings_dir(str(tmp_path / "emb"), vectors[:3_000], shard_size=1_000)
    write_embeddings_dir(str(tmp_path / "emb"), vectors[3_000:], shard_size=1_000, first_shard=3)  # keys again
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    before = pa.total_allocated_bytes()
    searcher = Searcher(tmp_path / "idx")
    assert pa.total_allocated_bytes() - before < searcher.ids.nbytes / 10  # mapped, not read
    assert searcher.keys is not None and sum(keys.num_rows for keys in searcher.keys) == 6_000
    with pytest.raises(ConfigError, match="in several shards \\(syn-00000, syn-00003\\): pass --shard"):
        searcher.locate("syn5")
    assert searcher.locate("syn5", shard="syn-00003") == ("syn-00003", "syn5")
    with pytest.raises(ConfigError, match="'syn99999' is not in the index"):
        searcher.locate("syn99999")
    hit = searcher.search_keys(["syn1500"], k=1, shard="syn-00004")[0][0]
    assert (hit.shard, hit.key) == ("syn-00004", "syn1500") and hit.score > 0.999
    assert searcher.shard_rows("syn-00004") == (4_000, 5_000)


def test_add_appends_to_lists_on_disk_and_the_new_vectors_are_found(tmp_path):
    from imgindex.indexes.build import add_parts, verify_index

    vectors = clustered_vectors(8_000, 16, clusters=40, seed=9)
    write_embeddings_dir(str(tmp_path / "emb"), vectors[:6_000], shard_size=2_000)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"),
                BuildOptions(index_key="IVF32,Flat", on_disk="always"), progress=False)
    write_embeddings_dir(str(tmp_path / "emb"), vectors[6_000:], shard_size=2_000, first_shard=3, prefix="new")
    manifest, added = add_parts(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    assert added == 2_000 and manifest.count == 8_000 and manifest.on_disk
    searcher = Searcher(tmp_path / "idx")
    for row in (0, 5_999, 6_000, 7_999):
        hit = searcher.search_vectors(vectors[row], k=1)[0][0]
        assert hit.key == (f"syn{row}" if row < 6_000 else f"new{row - 6_000}") and hit.score > 0.999
    assert searcher.locate("new1999") == ("new-00003", "new1999")
    assert verify_index(str(tmp_path / "idx"))["files"] == 10  # 6 of the build, 4 of the segment


def _move_parts(emb: Path, shards: range, where: Path) -> None:
    """Move parts (their file and their stats marker) out of or back into an embeddings directory."""
    for shard in shards:
        for folder, suffix in (("embeddings", "parquet"), ("_stats", "json")):
            (where / folder).mkdir(parents=True, exist_ok=True)
            os.replace(emb / folder / f"part-syn-{shard:05d}.{suffix}", where / folder / f"part-syn-{shard:05d}.{suffix}")


@pytest.fixture(scope="module")
def added(corpus, tmp_path_factory):
    """An on-disk index of the corpus's first 8 parts, whose parts are then deleted, and an --add of
    the last 4 on two processes: (index dir, the ivfdata's and index file's stat and manifest before)."""
    import shutil

    root, _ = corpus
    work = tmp_path_factory.mktemp("added")
    emb = work / "emb"
    shutil.copytree(root / "emb", emb)
    _move_parts(emb, range(8, 12), work / "later")
    before = build_index(str(emb), str(work / "idx"), BuildOptions(index_key="IVF64,Flat", on_disk="always"),
                         progress=False)
    stats = {name: os.stat(work / "idx" / name) for name in ("index.ivfdata", "index.faiss")}
    for shard in range(8):  # the --add must not read them
        (emb / "embeddings" / f"part-syn-{shard:05d}.parquet").unlink()
    _move_parts(work / "later", range(8, 12), emb)
    done = subprocess.run(CLI + ["index", "--add", str(emb), "--out", str(work / "idx"), "--procs", "2",
                                 "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "added 4000 vectors from 4 new parts" in done.stdout
    assert "recall@10 of the new vectors " in done.stdout and "that are new vectors" in done.stdout
    return work / "idx", stats, before


def test_add_to_lists_on_disk_leaves_them_untouched_and_reads_no_old_part(added):
    idx, stats, before = added
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["count"] == 12_000 and manifest["adds"][0]["executor"]["workers"] == 2
    for name, stat in stats.items():  # not rewritten, not even opened for writing
        now = os.stat(idx / name)
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        assert manifest["files"][name] == before.files[name]
    segment = manifest["segments"][0]
    assert segment["rows"] == 4_000 and {"lists.1.ilod", "lists.1.ivfdata", "ids.1.arrow"} <= set(manifest["files"])
    assert (idx / "lists.1.ivfdata").stat().st_size == 4_000 * 32 * 4 + 4_000 * 8  # the new codes and ids only


def test_an_index_extended_by_add_answers_as_one_built_at_once(added, corpus):
    """Searched exhaustively (every list), both return the same (shard, key) hits at the same scores:
    every vector is in the stacked lists under its row, and its row maps to its key."""
    idx, _, _ = added
    root, vectors = corpus
    ours, reference = Searcher(idx, params={"nprobe": 64}), Searcher(root / "one", params={"nprobe": 64})
    queries = vectors[np.random.default_rng(6).choice(len(vectors), 200, replace=False)]
    ha, hb = ours.search(queries, k=10).to_pydict(), reference.search(queries, k=10).to_pydict()
    np.testing.assert_allclose(ha["score"], hb["score"], atol=1e-5)
    assert list(zip(ha["query"], ha["shard"], ha["key"])) == list(zip(hb["query"], hb["shard"], hb["key"]))
    assert ours.locate("syn11999") == ("syn-00011", "syn11999") and ours.locate("syn5") == ("syn-00000", "syn5")


def test_recall_after_add_is_the_recall_a_full_recomputation_finds(added, corpus):
    from imgindex.indexes.recall import exact_neighbors, recall_at_k

    idx, _, before = added
    _, vectors = corpus
    manifest = json.loads((idx / "manifest.json").read_text())
    with np.load(idx / manifest["recall_set"]) as kept:
        ids, queries, scores, exact = kept["ids"], kept["vectors"], kept["scores"], kept["exact"]
    assert len(ids) == before.recall_queries and ids.max() < 8_000  # the build's queries
    truth = exact_neighbors(queries, [vectors], 11)  # over all 12,000 vectors, old parts included
    np.testing.assert_allclose(scores, truth.scores, atol=1e-5)
    assert (exact[:, :10] == truth.ids[:, :10]).mean() > 0.999  # the same neighbours but for exact ties
    searcher = Searcher(idx)
    _, found = searcher.index.search(queries, 11)
    assert manifest["recall_at_10"] == round(recall_at_k(found, truth, ids, 10), 4)
    assert "among all 12,000 vectors" in manifest["recall_covers"]
    # the new vectors as answers: of the true neighbours that are new rows, the share the search returns
    top = [row[(row != q) & (row >= 0)][:10] for row, q in zip(truth.ids, ids)]
    truth_new = [set(row[row >= 8_000].tolist()) for row in top]
    got = [set(row[(row != q) & (row >= 0)][:10].tolist()) for row, q in zip(found, ids)]
    slots = sum(len(t) for t in truth_new)
    assert slots > 100
    assert manifest["adds"][0]["recall_at_10_of_new"] == round(sum(len(t & g) for t, g in zip(truth_new, got))
                                                               / slots, 4)
    assert f"the {slots:,} of the 1,000 queries' exact top-10 neighbours" in manifest["adds"][0]["of_new_covers"]


def test_verify_passes_after_add_and_catches_a_damaged_segment(corpus, tmp_path):
    from imgindex.errors import Corrupt
    from imgindex.indexes.build import add_parts, verify_index

    _, vectors = corpus
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    write_embeddings_dir(str(emb), vectors[:4_000], shard_size=1_000)
    build_index(str(emb), str(idx), BuildOptions(index_key="IVF64,Flat", on_disk="always"), progress=False)
    write_embeddings_dir(str(emb), vectors[4_000:5_000], shard_size=1_000, first_shard=4, prefix="new")
    manifest, _ = add_parts(str(emb), str(idx), progress=False)
    assert verify_index(str(idx)) == {"files": len(manifest.files), "parts": 5}
    with open(idx / "lists.1.ivfdata", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(Corrupt, match="lists.1.ivfdata is corrupt"):
        verify_index(str(idx))
    with pytest.raises(Corrupt, match="lists.1.ivfdata is corrupt"):  # a small file: loading checks it whole
        Searcher(idx)


@pytest.mark.parametrize("on_disk", ["always", "never"])
def test_an_interrupted_add_leaves_the_index_as_it_was_and_a_rerun_finishes_it(corpus, tmp_path, monkeypatch, on_disk):
    from imgindex.formats.index_dir import IndexDir
    from imgindex.indexes.build import add_parts, verify_index

    _, vectors = corpus
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    write_embeddings_dir(str(emb), vectors[:6_000], shard_size=1_000)
    build_index(str(emb), str(idx), BuildOptions(index_key="IVF64,Flat", on_disk=on_disk), progress=False)
    write_embeddings_dir(str(emb), vectors[6_000:8_000], shard_size=1_000, first_shard=6, prefix="new")

    def interrupted(self, manifest, changed=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(IndexDir, "write_manifest", interrupted)
        with pytest.raises(KeyboardInterrupt):
            add_parts(str(emb), str(idx), progress=False)
    searcher = Searcher(idx)  # the index as it was: loads, answers, verifies
    assert searcher.manifest.count == 6_000 and searcher.search_vectors(vectors[5], k=1)[0][0].key == "syn5"
    verify_index(str(idx))
    manifest, added = add_parts(str(emb), str(idx), progress=False)
    assert added == 2_000 and manifest.count == 8_000 and manifest.adds[0]["executor"]["resumed_tasks"] >= 1
    hit = Searcher(idx).search_vectors(vectors[7_000], k=1)[0][0]
    assert (hit.shard, hit.key) == ("new-00007", "new1000")
    assert verify_index(str(idx))["files"] == len(manifest.files)


def test_keys_are_merged_from_the_tasks_sorted_runs_and_equal_one_sort_in_ram(tmp_path, monkeypatch):
    """Before, the driver read every (shard, key) into RAM to sort them (58 GB at 1B): now each task
    sorts its own and the driver merges the runs a block at a time (here 7 rows, many rounds)."""
    import pyarrow as pa

    from imgindex.formats import index_dir
    from imgindex.formats.index_dir import sorted_keys

    monkeypatch.setattr(index_dir, "MERGE_BLOCK", 7)
    read_table = index_dir.pq.read_table

    def no_whole_ids(path, *args, **kwargs):  # the tasks' own ids, yes; the index's, all at once, no
        assert not str(path).endswith("idx/ids.parquet"), "the driver read every id into RAM"
        return read_table(path, *args, **kwargs)

    monkeypatch.setattr(index_dir.pq, "read_table", no_whole_ids)
    vectors = clustered_vectors(3_000, 16, clusters=20, seed=12)
    write_embeddings_dir(str(tmp_path / "emb"), vectors[:1_500], shard_size=500)
    write_embeddings_dir(str(tmp_path / "emb"), vectors[1_500:], shard_size=500, first_shard=3)  # keys again
    manifest = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), BuildOptions(index_key="Flat"),
                           progress=False)
    assert manifest.build["executor"]["tasks"] > 1
    with pa.memory_map(str(tmp_path / "idx" / "keys.arrow")) as source:
        merged = pa.ipc.open_file(source).read_all()
    with pa.memory_map(str(tmp_path / "idx" / "ids.arrow")) as source:
        ids = pa.ipc.open_file(source).read_all()
    assert merged.equals(sorted_keys(ids, 0)) and merged.num_rows == 3_000
    assert merged["key"][:2].to_pylist() == ["syn0", "syn0"] and merged["shard"][:2].to_pylist() == [
        "syn-00000", "syn-00003"]


def test_merging_sorted_runs_of_any_sizes_gives_the_one_sort(tmp_path):
    import pyarrow as pa

    from imgindex.formats.index_dir import merge_sorted_keys, sorted_keys

    rng = np.random.default_rng(3)
    runs, start = [], 0
    for size in (0, 1, 37, 500, 64, 250):  # an empty run, a single row, runs larger and smaller than a block
        keys = [f"k{v}" for v in rng.integers(0, 300, size)]  # many equal keys, within and across runs
        ids = pa.table({"shard": [f"s{v}" for v in rng.integers(0, 3, size)], "key": keys},
                       schema=pa.schema([("shard", pa.string()), ("key", pa.string())]))
        runs.append((ids, start))
        start += size
    merged_path = tmp_path / "keys.arrow"
    rows = merge_sorted_keys([sorted_keys(ids, first).to_batches(max_chunksize=13) for ids, first in runs],
                             merged_path, block=16)
    with pa.memory_map(str(merged_path)) as source:
        merged = pa.ipc.open_file(source).read_all()
    whole = sorted_keys(pa.concat_tables([ids for ids, _ in runs]), 0)
    assert rows == start and merged.select(["key", "shard"]).equals(whole.select(["key", "shard"]))
    triples = lambda t: sorted(zip(t["key"].to_pylist(), t["shard"].to_pylist(), t["row"].to_pylist()))  # noqa: E731
    assert triples(merged) == triples(whole)  # every row once, under its own key and shard


def _sub_index(count: int = 40_000, dim: int = 64):
    import faiss

    vectors = clustered_vectors(count, dim, clusters=64, seed=3)
    index = faiss.index_factory(dim, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:5_000])
    index.add(vectors)
    return index, vectors[:20], count * dim * 4


def traced_peak(step) -> tuple[object, int]:
    """(step's result, the peak of Python-tracked memory while it ran: numpy arrays and bytes)."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = step()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("where", ["local", "remote"])
def test_a_sub_index_is_written_and_read_back_without_a_copy_of_it_in_memory(tmp_path, where):
    """Before: BuildDir.write_index held faiss.serialize_index's array and its .tobytes() copy at
    once, so a build worker peaked at three times its sub-index (the 5M benchmark's one-process
    build: 12.7 GB of anonymous memory for sub-indexes of 3.9 GB); on a remote store it also built
    the whole file in a BytesIO and uploaded its getvalue(), and read an index back as one bytes
    object. "remote" is the fsspec code path of object stores, on a filesystem that is not local
    (a DirFileSystem over this folder), so that only this process's copies are counted."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    from imgindex.formats.index_dir import BuildDir

    index, queries, codes = _sub_index()
    build = BuildDir(str(tmp_path / "_build"))
    build.makedirs()
    if where == "remote":
        build.fs, build.root, build.local = DirFileSystem(str(tmp_path / "_build"), LocalFileSystem()), "", False
    _, peak = traced_peak(lambda: build.write_index("add-00000.faiss", index))
    assert peak < codes / 4, (peak, codes)
    assert (tmp_path / "_build" / "add-00000.faiss").stat().st_size > codes
    back, peak = traced_peak(lambda: build.read_index("add-00000.faiss"))
    assert peak < codes / 4, (peak, codes)
    index.nprobe = back.nprobe = 8
    assert np.array_equal(back.search(queries, 5)[1], index.search(queries, 5)[1])
