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
    assert searcher.keys is not None and searcher.keys.num_rows == 6_000
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
    assert verify_index(str(tmp_path / "idx"))["files"] == 5
