"""Dedup at scale: the partitioned tiers give the one-process pairs on every executor, a killed
task is retried, an interrupted run resumes (or leaves nothing behind), and the bf16 products
lose no pair. Small synthetic vectors with planted copies and a crowd that hits the cap."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import imgindex.indexes.dedup.partitions as partitions
from imgindex.errors import ConfigError
from imgindex.executors.placement import Executor
from imgindex.formats.embeddings_dir import normalize_rows
from imgindex.indexes.build import BuildOptions, build_index
from imgindex.indexes.dedup import DedupOptions, find_duplicates
from imgindex.indexes.dedup.ivf_join import range_join
from imgindex.indexes.dedup.partitions import Scale, partitioned_join
from imgindex.indexes.dedup.workdir import WorkDir
from imgindex.indexes.query import Searcher
from synthetic import clustered_vectors, write_embeddings_dir
from test_ivf_join import Rows

THRESHOLD = 0.95
CAP = 6


def planted_with_crowd(count=6000, dim=32, copies=400, crowd=30, seed=3) -> np.ndarray:
    """Clustered vectors, near copies of `copies` of them, and a crowd of `crowd` copies of one
    vector (more neighbours than CAP above the threshold)."""
    rng = np.random.default_rng(seed)
    base = clustered_vectors(count, dim, clusters=60, spread=1.0, seed=seed)
    origin = rng.choice(count, copies, replace=False)
    near = base[origin] + rng.standard_normal((copies, dim)).astype(np.float32) * 0.2 / np.sqrt(dim)
    many = base[[7] * crowd] + rng.standard_normal((crowd, dim)).astype(np.float32) * 0.05 / np.sqrt(dim)
    return normalize_rows(np.vstack([base, near, many])).astype(np.float32)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    vectors = planted_with_crowd()
    write_embeddings_dir(str(root / "emb"), vectors, shard_size=1700)
    build_index(str(root / "emb"), str(root / "idx"), BuildOptions(flat_threshold=1000, eval_queries=200),
                progress=False)
    return root / "idx", vectors


def pair_set(q, d) -> set[tuple[int, int]]:
    return set(zip(np.asarray(q).tolist(), np.asarray(d).tolist()))


def dedup_pairs(result) -> set[tuple[str, str]]:
    return {(p["a_key"], p["b_key"]) for p in result.pairs.select(["a_key", "b_key"]).to_pylist()}


EMBEDDING = DedupOptions(methods=("embedding",), threshold=THRESHOLD, max_neighbors=CAP)


@pytest.mark.parametrize("nprobe", [1, 4, 32])
def test_partitioned_join_gives_exactly_the_one_process_join(index, tmp_path, monkeypatch, nprobe):
    monkeypatch.setattr(partitions, "MIN_TASKS", 40)  # many groups of lists, each its own task
    path, vectors = index
    searcher = Searcher(path)
    searcher.index.nprobe = nprobe
    ivf = searcher.index
    q1, d1, s1, capped1 = range_join(ivf, Rows(vectors), vectors, nprobe, THRESHOLD, CAP, self_join=True)
    with WorkDir(tmp_path) as work:
        q, d, s, capped, stats = partitioned_join(searcher, Scale(work), THRESHOLD, CAP)
        assert stats["join_tasks"] == 40 and stats["partition_tasks"] == 4
    assert pair_set(q, d) == pair_set(q1, d1) and len(q) == len(q1) > 400
    assert capped == capped1 >= 30  # the crowd's members had more than CAP neighbours
    order, order1 = np.lexsort((d, q)), np.lexsort((d1, q1))
    np.testing.assert_allclose(s[order], s1[order1], atol=1e-6)
    assert not (tmp_path / "imgindex-dedup-work").exists()  # removed after success


@pytest.mark.parametrize("nprobe", [4, 16])
def test_the_partitions_hold_one_copy_of_the_vectors(index, tmp_path, nprobe):
    """Each vector is stored once (in the partition of its own list); probing is a row id per
    (row, list probed): the runs are at most the vectors' float32 bytes plus 8 (nprobe + 2) bytes a
    row and each run's offsets, whatever nprobe."""
    path, vectors = index
    searcher = Searcher(path)
    searcher.index.nprobe = nprobe
    nlist = searcher.index.nlist
    with WorkDir(tmp_path) as work:
        q, d, _, _, stats = partitioned_join(searcher, Scale(work), THRESHOLD, CAP)
        runs = [p for p in (work.root / "embedding" / "runs").iterdir() if p.is_file()]
        written = sum(p.stat().st_size for p in runs)
    overhead = len(vectors) * 8 * (nprobe + 2) + stats["partition_tasks"] * (16 * (nlist + 1) + 5 * 128)
    assert written <= vectors.nbytes + overhead, (written, vectors.nbytes)
    assert stats["partition_bytes"] == written and stats["vector_bytes"] == vectors.nbytes
    assert stats["storage"] == "float32" and len(q) > 400


class KillsItsWorkerOnce(partitions.JoinWorkers):
    """The real workers, except that the first worker to take join task 3 SIGKILLs its own process."""

    def __call__(self, slot, name):
        worker = super().__call__(slot, name)
        run = worker.run

        def run_or_die(task, progress=None):
            if task.name == "join-000003":
                try:
                    os.close(os.open(Path(self.stage) / "killed-once", os.O_CREAT | os.O_EXCL))
                    os.kill(os.getpid(), signal.SIGKILL)
                except FileExistsError:
                    pass
            return run(task, progress)

        worker.run = run_or_die
        return worker


def test_procs_give_the_in_process_pairs_and_a_killed_task_is_retried(index, tmp_path, monkeypatch, capfd):
    path, _ = index
    single = find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path / "one")
    monkeypatch.setattr(partitions, "JoinWorkers", KillsItsWorkerOnce)
    pooled = find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path / "two",
                             executor=Executor.from_flags(procs=2, retries=1))
    assert "exited with code -9" in capfd.readouterr().err  # the death was seen and said
    assert dedup_pairs(pooled) == dedup_pairs(single) and len(dedup_pairs(single)) > 400
    assert pooled.stats["partitions"]["workers"] == 2
    assert pooled.groups.equals(single.groups)
    assert not (tmp_path / "two" / "imgindex-dedup-work").exists()


JOIN = partitions.JoinWorker.join


def interrupt_the_join_after(monkeypatch, tasks: int) -> None:
    """The next run's join tasks raise KeyboardInterrupt (Ctrl-C) after `tasks` of them finished."""
    join, calls = JOIN, []

    def join_then_interrupt(self, task):
        calls.append(task.name)
        if len(calls) > tasks:
            raise KeyboardInterrupt
        return join(self, task)

    monkeypatch.setattr(partitions.JoinWorker, "join", join_then_interrupt)


def test_an_interrupted_run_leaves_no_files_unless_kept_and_then_resumes_with_the_same_output(index, tmp_path,
                                                                                              monkeypatch):
    path, _ = index
    reference = find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path / "ref")
    work = tmp_path / "w" / "imgindex-dedup-work"
    with monkeypatch.context() as patch:
        interrupt_the_join_after(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path / "w")
        assert not work.exists()  # not kept: gone after the interrupt
        interrupt_the_join_after(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path / "w", keep_work=True)
    assert len(list((work / "embedding" / "pairs").glob("*.npz"))) == 5
    resumed = find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path / "w")
    part = resumed.stats["partitions"]
    assert part["reused_tasks"] == part["partition_tasks"] + 5 and resumed.stats["work"] == {"embedding": "resumed"}
    assert dedup_pairs(resumed) == dedup_pairs(reference) and resumed.groups.equals(reference.groups)
    assert not work.exists()


def test_a_rerun_with_other_settings_starts_the_stage_again(index, tmp_path, monkeypatch):
    path, _ = index
    with monkeypatch.context() as patch:
        interrupt_the_join_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path, keep_work=True)
    other = DedupOptions(methods=("embedding",), threshold=0.97, max_neighbors=CAP)
    result = find_duplicates(path, other, progress=False, workdir=tmp_path)
    assert result.stats["partitions"]["reused_tasks"] == 0
    assert result.stats["work"]["embedding"].startswith("cleared (changed: ") and "threshold" in \
        result.stats["work"]["embedding"]
    assert min(result.pairs["similarity"].to_pylist()) >= 0.97


def test_bf16_products_re_scored_in_fp32_lose_no_pair(index, tmp_path):
    """The GPU's code path (torch products in bf16, candidates re-scored in float32), run on the CPU."""
    pytest.importorskip("torch")
    path, _ = index
    fp32 = find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path)
    bf16 = find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path, precision="bf16")
    assert bf16.stats["partitions"]["precision"] == "bf16"
    assert dedup_pairs(bf16) == dedup_pairs(fp32)
    np.testing.assert_allclose(np.sort(bf16.pairs["similarity"].to_numpy()),
                               np.sort(fp32.pairs["similarity"].to_numpy()), atol=1e-6)


def test_products_on_a_gpu_give_the_cpu_pairs(index, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    path, _ = index
    cpu = find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path)
    for precision in ("bf16", "fp32"):
        gpu = find_duplicates(path, EMBEDDING, progress=False, workdir=tmp_path, device="cuda", precision=precision)
        assert dedup_pairs(gpu) == dedup_pairs(cpu)


def test_bad_scale_options_are_clear_errors(index, tmp_path):
    path, _ = index
    with pytest.raises(ConfigError, match="--ray and --procs do not mix"):
        Executor.from_flags(procs=2, ray=2)
    with pytest.raises(ConfigError, match="--keep-work needs a place"):
        find_duplicates(path, EMBEDDING, progress=False, keep_work=True)
    with pytest.raises(ConfigError, match="--device for dedup is cpu or cuda"):
        find_duplicates(path, EMBEDDING, progress=False, device="tpu")


@pytest.fixture(scope="module")
def hashed_index(tmp_path_factory):
    """Rows with planted byte-identical copies (one file 130 times: beyond the 100 partners each
    row is paired with) and planted perceptual hashes 0 to 7 bits from their originals; some nulls."""
    rng = np.random.default_rng(11)
    count = 3000
    sha = [rng.bytes(32).hex() for _ in range(count)]
    for g in range(60):
        for copy in range(1, 2 + g % 3):
            sha[1000 + 10 * g + copy] = sha[1000 + 10 * g]
    for row in range(2000, 2130):
        sha[row] = sha[5]
    phash = rng.integers(-2**63, 2**63 - 1, count, dtype=np.int64)
    unsigned = phash.view(np.uint64)
    for i in range(200):
        bits = rng.choice(64, i % 8, replace=False)
        unsigned[2500 + i] = unsigned[i] ^ np.uint64(sum(1 << int(b) for b in bits))
    sha_column = [None if row % 97 == 0 else value for row, value in enumerate(sha)]
    phash_column = [None if row % 89 == 0 else int(value) for row, value in enumerate(phash)]
    root = tmp_path_factory.mktemp("hashed")
    vectors = clustered_vectors(count, 16, clusters=30, spread=1.0, seed=2)
    write_embeddings_dir(str(root / "emb"), vectors, shard_size=700,
                         columns={"sha256": sha_column, "phash": phash_column})
    build_index(str(root / "emb"), str(root / "idx"), BuildOptions(flat_threshold=1000, eval_queries=100),
                progress=False)
    return root / "idx"


def one_process_pairs(path, options, tmp_path) -> set[tuple[str, str, str]]:
    """Today's one-process tiers (tiers.find_pairs over the whole corpus): (a key, b key, kind)."""
    from imgindex.indexes.dedup.corpus import Corpus
    from imgindex.indexes.dedup.tiers import find_pairs

    searcher = Searcher(path)
    corpus = Corpus.of_index(searcher, tmp_path)
    found = find_pairs(searcher, corpus, corpus, options, True, {})
    keys = corpus.meta["key"].to_pylist()
    kinds = ("exact", "phash", "embedding")
    return {(keys[a], keys[b], kinds[k]) for a, b, k in zip(found.a, found.b, found.kinds)}


def keyed_pairs(result) -> set[tuple[str, str, str]]:
    return {(p["a_key"], p["b_key"], p["kind"]) for p in result.pairs.select(["a_key", "b_key", "kind"]).to_pylist()}


@pytest.mark.parametrize("distance, procs", [(0, None), (4, None), (4, 2), (9, None)])
def test_exact_and_phash_tasks_give_the_one_process_pairs(hashed_index, tmp_path, distance, procs):
    options = DedupOptions(methods=("exact", "phash"), phash_distance=distance)
    expected = one_process_pairs(hashed_index, options, tmp_path)
    result = find_duplicates(hashed_index, options, progress=False, workdir=tmp_path,
                             executor=Executor.from_flags(procs=procs))
    assert keyed_pairs(result) == expected
    kinds = [k for _, _, k in expected]
    assert kinds.count("exact") > 130 * 100 // 2 and kinds.count("phash") >= 20 * (min(distance, 7) + 1)
    stages = result.stats["hash_partitions"]
    assert stages["partition_tasks"] == 5 and stages["join_tasks"] == 2 * partitions.MIN_TASKS
    assert not (tmp_path / "imgindex-dedup-work").exists()


def test_dedup_cli_scale_flags_are_checked_in_one_line(index, tmp_path):
    import subprocess
    import sys

    path, _ = index
    base = [sys.executable, "-m", "imgindex", "dedup", "--index", str(path), "--method", "embedding",
            "--threshold", "0.95", "--no-progress"]
    for extra, message in ((["--procs", "2", "--ray", "2", "--out", tmp_path / "o"], "do not mix"),
                           (["--dry-run", "--keep-work"], "--keep-work needs a place"),
                           (["--out", tmp_path / "o", "--against", tmp_path / "nope", "--procs", "2"], "nope")):
        done = subprocess.run(base + [str(e) for e in extra], capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    done = subprocess.run(base + ["--out", str(tmp_path / "o"), "--procs", "2"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "o" / "pairs.parquet").exists() and not (tmp_path / "o" / "imgindex-dedup-work").exists()


def one_process_leaks(path, against, options, tmp_path) -> set[tuple[str, str, str]]:
    """Today's one-process leakage check (tiers.find_pairs over both whole corpora): (a key, b key, kind)."""
    from imgindex.formats.embeddings_dir import EmbeddingsDir
    from imgindex.indexes.dedup.corpus import Corpus
    from imgindex.indexes.dedup.tiers import find_pairs

    searcher = Searcher(path)
    test = EmbeddingsDir(str(against))
    train = Corpus.of_index(searcher, tmp_path)
    queries = Corpus([(test, p) for p in test.parts()], test.dim, tmp_path, name="against")
    found = find_pairs(searcher, queries, train, options, False, {})
    a_keys, b_keys = queries.meta["key"].to_pylist(), train.meta["key"].to_pylist()
    kinds = ("exact", "phash", "embedding")
    return {(a_keys[a], b_keys[b], kinds[k]) for a, b, k in zip(found.a, found.b, found.kinds)}


@pytest.fixture(scope="module")
def against_dir(index, tmp_path_factory):
    """Another corpus: near copies of 300 indexed rows, 40 copies of the crowd's vector (more
    than CAP neighbours each), 500 unrelated vectors; in 3 parts."""
    _, vectors = index
    rng = np.random.default_rng(5)
    origin = rng.choice(6000, 300, replace=False)
    near = vectors[origin] + rng.standard_normal((300, 32)).astype(np.float32) * 0.2 / np.sqrt(32)
    crowd = vectors[[7] * 40] + rng.standard_normal((40, 32)).astype(np.float32) * 0.05 / np.sqrt(32)
    fresh = clustered_vectors(500, 32, clusters=20, spread=1.0, seed=99)
    root = tmp_path_factory.mktemp("against")
    write_embeddings_dir(str(root / "test"), normalize_rows(np.vstack([near, crowd, fresh])).astype(np.float32),
                         shard_size=300, prefix="test")
    return root / "test"


@pytest.mark.parametrize("procs", [None, 2])
def test_leakage_as_tasks_gives_the_one_process_leaks(index, against_dir, tmp_path, procs):
    from imgindex.indexes.dedup import find_leaks

    path, _ = index
    expected = one_process_leaks(path, against_dir, EMBEDDING, tmp_path)
    result = find_leaks(path, str(against_dir), EMBEDDING, progress=False, workdir=tmp_path / "w",
                        executor=Executor.from_flags(procs=procs))
    assert keyed_pairs(result) == expected and len(expected) > 300
    part = result.stats["partitions"]
    assert part["partition_tasks"] == 4 + 3 and part["workers"] == (procs or 1)
    assert result.stats["images_with_capped_neighbours"] >= 40  # each crowd copy had more than CAP
    assert result.stats["leaked"] == len({a for a, _, _ in expected})
    assert not (tmp_path / "w" / "imgindex-leaks-work").exists()


def test_keep_work_without_a_place_is_refused_before_any_work(index, against_dir, monkeypatch):
    import imgindex.indexes.dedup.find as find

    def no_work(*args):
        raise AssertionError("the threshold was resolved (calibrated) before the options were refused")

    monkeypatch.setattr(find, "resolve_threshold", no_work)
    path, _ = index
    for run in (lambda: find.find_duplicates(path, EMBEDDING, progress=False, keep_work=True),
                lambda: find.find_leaks(path, str(against_dir), EMBEDDING, progress=False, keep_work=True)):
        with pytest.raises(ConfigError, match="--keep-work needs a place"):
            run()


def test_leakage_as_tasks_with_every_tier_gives_the_one_process_leaks(hashed_index, tmp_path, monkeypatch):
    """Byte copies, phash near copies and embedding near copies of indexed rows, and unrelated rows."""
    from imgindex.formats.embeddings_dir import EmbeddingsDir
    from imgindex.indexes.dedup import find_leaks

    emb = EmbeddingsDir(str(hashed_index.parent / "emb"))
    table = pa.concat_tables([emb.read_columns(p.shard, ["sha256", "phash"]) for p in emb.parts()])
    vectors = np.concatenate([v for _, _, v in emb.iter_batches(emb.parts())])
    rng = np.random.default_rng(8)
    sha, phash = table["sha256"].to_pylist(), table["phash"].to_pylist()
    rows = np.r_[np.arange(1000, 1100), np.arange(0, 100), np.arange(2000, 2010), rng.choice(3000, 200)]
    near = normalize_rows(vectors[rows] + rng.standard_normal((len(rows), 16)).astype(np.float32) * 0.3 / 4)
    test_sha = [sha[r] if i < 100 or 200 <= i < 210 else None for i, r in enumerate(rows)]
    test_phash = [None if phash[r] is None or not 100 <= i < 200 else phash[r] ^ (1 << int(i % 5)) for i, r in
                  enumerate(rows)]
    write_embeddings_dir(str(tmp_path / "test"), near.astype(np.float32), shard_size=150, prefix="test",
                         columns={"sha256": test_sha, "phash": test_phash})
    options = DedupOptions(threshold=0.97, max_neighbors=CAP, phash_distance=3)
    expected = one_process_leaks(hashed_index, tmp_path / "test", options, tmp_path)

    def in_the_driver(*args, **kwargs):
        raise AssertionError("the driver joined the two corpora's hashes itself (every row's hashes in one process)")

    import imgindex.indexes.dedup.find as find
    import imgindex.indexes.dedup.hash_tiers as hash_tiers
    import imgindex.indexes.dedup.tiers as tiers
    for module in (find, hash_tiers, tiers):  # the workers (spawned processes) keep theirs
        for name in ("exact_pairs", "phash_pairs"):
            monkeypatch.setattr(module, name, in_the_driver, raising=False)
    result = find_leaks(hashed_index, str(tmp_path / "test"), options, progress=False, workdir=tmp_path / "w",
                        executor=Executor.from_flags(procs=2))
    assert keyed_pairs(result) == expected
    hashes = result.stats["hash_partitions"]
    assert hashes["partition_tasks"] == len(emb.parts()) + len(EmbeddingsDir(str(tmp_path / "test")).parts())
    assert hashes["join_tasks"] >= 2
    kinds = [k for _, _, k in expected]
    assert kinds.count("exact") >= 110 and kinds.count("phash") >= 50 and kinds.count("embedding") >= 50
