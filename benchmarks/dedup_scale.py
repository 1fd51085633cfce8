"""Dedup quality and scale on synthetic vectors with planted duplicate groups, one run.

    python benchmarks/dedup_scale.py [--count 200000] [--dim 768] [--executors one,procs2,ray2]
        [--direct] [--check-exact] [--sample-exact 2000] [--index-key IVF256,Flat] [--results results.jsonl]

Writes `count` clustered vectors plus planted groups (2 to 5 near copies, cosine ~0.99) as an
embeddings directory, builds the default index in a separate process, then runs the embedding
tier of `find_duplicates` in a fresh process per executor (in-process, `--procs 2`, `--ray 2`: a
local Ray on the loopback) and prints, for each, its time (and the partition and join stages'),
the driver's peak RSS (VmHWM: ru_maxrss would count the parent's memory at fork), the workers'
peak RSS (each task reports its process's VmHWM), the work folder's size at its largest (the
partitions, the pairs' rows) and the partitions' bytes, each against the vectors' float32 size, and whether its pairs are identical to
the in-process run's. Pair recall and precision are measured against the planted groups, against
brute force for `--sample-exact` sampled rows (every pair they are in), and with --check-exact
against exact brute force over all pairs (slow at 1M). With --direct, the join without partitions
(one process, one memory-mapped copy of every vector: what dedup did before the tasks) is timed at
the same nprobe, its pairs compared, and each run's partition + join time printed against it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from imgindex.formats.embeddings_dir import normalize_rows  # noqa: E402
from synthetic import clustered_vectors, write_embeddings_dir  # noqa: E402
from results import append_result  # noqa: E402

RUN_DEDUP = """
import json, sys, time
from imgindex.executors.placement import Executor
from imgindex.indexes.dedup import DedupOptions, find_duplicates
kind, count = sys.argv[4], int(sys.argv[5])
start = time.time()
result = find_duplicates(sys.argv[1], DedupOptions(methods=("embedding",), threshold=float(sys.argv[3])),
                         progress=False, workdir=sys.argv[6],
                         executor=Executor.from_flags(procs=count if kind == "procs" else None,
                                                      ray=count if kind == "ray" else None))
pairs = result.pairs.select(["a_key", "b_key"]).to_pydict()
json.dump({"pairs": list(zip(pairs["a_key"], pairs["b_key"])), "stats": result.stats,
           "seconds": time.time() - start,
           "peak_rss_mb": int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0]) / 1024},
          open(sys.argv[2], "w"))
"""

# The join without partitions, for reference: the pre-partition one-process path (dedup.ivf_join's
# range_join over one memory-mapped copy of every vector, the index's own lists), at the nprobe the
# tier's run chose: the time of the copy and the join, the pairs, the peak RSS.
RUN_DIRECT = """
import json, sys, time
import faiss
from imgindex.indexes.dedup.corpus import Corpus
from imgindex.indexes.dedup.find import _searcher
from imgindex.indexes.dedup.ivf_join import range_join
from imgindex.indexes.dedup.workdir import WorkDir
searcher = _searcher(sys.argv[1])
ivf = faiss.extract_index_ivf(searcher.index)
nprobe, threshold = int(sys.argv[3]), float(sys.argv[4])
with WorkDir(sys.argv[5], False) as work:
    start = time.time()
    whole = Corpus.of_index(searcher, work.root, False)
    copied = time.time()
    q, d, _, _ = range_join(ivf, whole, whole.vectors, nprobe, threshold, 100, True, False)  # DedupOptions.max_neighbors
    json.dump({"copy_s": copied - start, "join_s": time.time() - copied,
               "pairs": [[int(a), int(b)] for a, b in zip(q, d)],
               "peak_rss_mb": int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0]) / 1024},
              open(sys.argv[2], "w"))
"""


def planted(count: int, dim: int, groups: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = clustered_vectors(count, dim, clusters=max(100, count // 20), spread=1.0, seed=seed)
    originals = rng.choice(count, groups, replace=False)
    sizes = rng.integers(1, 5, groups)
    copies = np.repeat(originals, sizes)
    noise = rng.standard_normal((len(copies), dim)).astype(np.float32) * (0.12 / np.sqrt(dim))
    vectors = np.vstack([base, normalize_rows(base[copies] + noise)]).astype(np.float32)
    truth = set()
    members: dict[int, list[int]] = {}
    for i, origin in enumerate(copies):
        members.setdefault(int(origin), [int(origin)]).append(count + i)
    for group in members.values():
        truth |= {(a, b) for a in group for b in group if a < b}
    return vectors, truth


def exact_pairs(vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Brute force over all pairs (faiss's flat range search): O(N^2 d), slow at 1M."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    lims, _, ids = flat.range_search(vectors, threshold - 1e-6)
    queries = np.repeat(np.arange(len(vectors)), np.diff(lims).astype(np.int64))
    return {(int(a), int(b)) for a, b in zip(queries, ids) if a < b}


def sample_pairs(vectors: np.ndarray, threshold: float, sample: int, seed: int = 1) -> tuple[set, np.ndarray]:
    """Every pair at or above `threshold` that one of `sample` random rows is in (brute force)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(sample, len(vectors)), replace=False))
    truth = set()
    for start in range(0, len(rows), 256):
        block = rows[start:start + 256]
        i, j = np.nonzero(vectors[block] @ vectors.T >= threshold)
        truth |= {tuple(sorted((int(block[a]), int(b)))) for a, b in zip(i, j) if block[a] != b}
    return truth, rows


EXECUTORS = {"one": ("local", 1), "procs2": ("procs", 2), "ray2": ("ray", 2)}


def run_dedup(work: Path, name: str, threshold: float) -> dict:
    kind, count = EXECUTORS[name]
    env = {**os.environ, "RAY_TMPDIR": str(work / "ray"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    (work / "ray").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-c", RUN_DEDUP, str(work / "idx"), str(work / f"{name}.json"), str(threshold),
                    kind, str(count), str(work / f"work-{name}")], check=True, cwd=ROOT, env=env)
    return json.loads((work / f"{name}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--groups", type=int, help="planted groups (default count / 100)")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--check-exact", action="store_true", help="also compare with brute force over all pairs")
    parser.add_argument("--sample-exact", type=int, default=2000, metavar="N",
                        help="compare the pairs of N sampled rows with brute force (default 2000)")
    parser.add_argument("--executors", default="one,procs2,ray2", help="comma list of one, procs2, ray2")
    parser.add_argument("--direct", action="store_true", help="also time the one-process join without partitions "
                        "(ivf_join.range_join over a memory-mapped copy of every vector) at the same nprobe")
    parser.add_argument("--results", help="append a JSON line of the figures to this file")
    parser.add_argument("--index-key", metavar="FACTORY",
                        help="the index's faiss factory string (default: imgindex index's choice, flat below 50k: "
                             "e.g. IVF256,Flat to run the partitioned tier at a small count)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imgindex-dedup-bench-"))
    vectors, truth = planted(args.count, args.dim, args.groups or args.count // 100)
    write_embeddings_dir(str(work / "emb"), vectors, shard_size=50_000)
    start = time.time()
    subprocess.run([sys.executable, "-m", "imgindex", "index", str(work / "emb"), "--out", str(work / "idx"),
                    "--no-progress"] + (["--index-key", args.index_key] if args.index_key else []),
                   check=True, cwd=ROOT)
    build_s = time.time() - start
    runs = {name: run_dedup(work, name, args.threshold) for name in args.executors.split(",")}
    direct = None
    nprobe = next(iter(runs.values()))["stats"].get("partitions", {}).get("nprobe")
    if args.direct and nprobe:
        subprocess.run([sys.executable, "-c", RUN_DIRECT, str(work / "idx"), str(work / "direct.json"), str(nprobe),
                        str(args.threshold), str(work / "work-direct")], check=True, cwd=ROOT)
        direct = json.loads((work / "direct.json").read_text())
    keyed = {name: {tuple(sorted((int(a[3:]), int(b[3:])))) for a, b in run["pairs"]} for name, run in runs.items()}
    first = next(iter(runs))
    found = keyed[first]
    truth_sample, sampled = sample_pairs(vectors, args.threshold, args.sample_exact)
    in_sample = {p for p in found if np.isin(p, sampled).any()}
    vectors_mb = vectors.nbytes / 2**20
    figures = {
        "benchmark": "dedup_scale", "count": len(vectors), "dim": args.dim, "threshold": args.threshold,
        "cores": os.cpu_count(), "planted_pairs": len(truth), "found_pairs": len(found),
        "planted_pair_recall": round(len(found & truth) / max(1, len(truth)), 4),
        "planted_pair_precision": round(len(found & truth) / max(1, len(found)), 4),
        "sampled_rows": len(sampled), "sample_exact_pairs": len(truth_sample),
        "sample_pairs_identical_to_brute_force": in_sample == truth_sample,
        "index_build_s": round(build_s, 1), "vectors_mb": round(vectors_mb),
        "search": runs[first]["stats"].get("search"), "machine": platform.machine(), "runs": {},
    }
    for name, run in runs.items():
        part = run["stats"].get("partitions", {})
        figures["runs"][name] = {
            "dedup_s": round(run["seconds"], 1), "partition_s": part.get("partition_s"), "join_s": part.get("join_s"),
            "driver_peak_rss_mb": round(run["peak_rss_mb"]), "worker_peak_rss_mb": part.get("worker_peak_rss_mb"),
            "work_mb": round(run["stats"].get("work_bytes", 0) / 2**20),
            "work_over_vectors": round(run["stats"].get("work_bytes", 0) / 2**20 / vectors_mb, 2),
            "partition_mb": round(part.get("partition_bytes", 0) / 2**20, 1),
            "partitions_over_vectors": round(part.get("partition_bytes", 0) / max(1, vectors.nbytes), 3),
            "nprobe": part.get("nprobe"), "storage": part.get("storage"),
            "queries_read_elsewhere": part.get("queries_read_elsewhere"),
            "tasks": [part.get("partition_tasks"), part.get("join_tasks")], "workers": part.get("workers"),
            "pairs_identical_to_first": keyed[name] == found,
            "speedup_over_first": round(runs[first]["seconds"] / run["seconds"], 2),
        }
    if direct:  # the partitioned runs' embedding stages against the one-process join without partitions
        by_index = {tuple(sorted(p)) for p in direct["pairs"]}
        seconds = direct["copy_s"] + direct["join_s"]
        figures["direct"] = {"copy_s": round(direct["copy_s"], 1), "join_s": round(direct["join_s"], 1),
                             "peak_rss_mb": round(direct["peak_rss_mb"]), "pairs": len(by_index),
                             "pairs_identical": all(found == by_index for found in keyed.values())}
        for name, run in figures["runs"].items():
            run["stages_over_direct"] = round(((run["partition_s"] or 0) + (run["join_s"] or 0)) / seconds, 2)
    if args.check_exact:
        exact = exact_pairs(vectors, args.threshold)
        figures["exact_pairs"] = len(exact)
        figures["pair_recall_vs_exact"] = round(len(found & exact) / max(1, len(exact)), 4)
        figures["pair_precision_vs_exact"] = round(len(found & exact) / max(1, len(found)), 4)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=1))
    append_result(args.results, figures)


if __name__ == "__main__":
    main()
