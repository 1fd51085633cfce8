"""Dedup quality and scale on synthetic vectors with planted duplicate groups, one run.

    python benchmarks/dedup_scale.py [--count 200000] [--dim 768] [--check-exact] [--results results.jsonl]

Writes `count` clustered vectors plus planted groups (2 to 5 near copies, cosine ~0.99) as an
embeddings directory, builds the default index in a separate process, then runs the embedding
tier of `find_duplicates` in a fresh process and prints its time and peak RSS (VmHWM: ru_maxrss would count the
parent's memory at fork) against the
vectors' size. Pair recall and precision are measured against the planted groups and, with
--check-exact, against exact brute force over all pairs (blocked matrix products: slow at 1M).
"""
from __future__ import annotations

import argparse
import json
import platform
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
from imgindex.indexes.dedup import DedupOptions, find_duplicates
start = time.time()
result = find_duplicates(sys.argv[1], DedupOptions(methods=("embedding",), threshold=float(sys.argv[3])),
                         progress=False)
pairs = result.pairs.select(["a_key", "b_key"]).to_pydict()
json.dump({"pairs": list(zip(pairs["a_key"], pairs["b_key"])), "stats": result.stats,
           "seconds": time.time() - start,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--groups", type=int, help="planted groups (default count / 100)")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--check-exact", action="store_true", help="also compare with brute force over all pairs")
    parser.add_argument("--results", help="append a JSON line of the figures to this file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imgindex-dedup-bench-"))
    vectors, truth = planted(args.count, args.dim, args.groups or args.count // 100)
    write_embeddings_dir(str(work / "emb"), vectors, shard_size=50_000)
    start = time.time()
    subprocess.run([sys.executable, "-m", "imgindex", "index", str(work / "emb"), "--out", str(work / "idx"),
                    "--no-progress"], check=True, cwd=ROOT)
    build_s = time.time() - start
    subprocess.run([sys.executable, "-c", RUN_DEDUP, str(work / "idx"), str(work / "out.json"), str(args.threshold)],
                   check=True, cwd=ROOT)
    run = json.loads((work / "out.json").read_text())
    found = {tuple(sorted((int(a[3:]), int(b[3:])))) for a, b in run["pairs"]}
    vectors_mb = vectors.nbytes / 2**20
    figures = {
        "benchmark": "dedup_scale", "count": len(vectors), "dim": args.dim, "threshold": args.threshold,
        "planted_pairs": len(truth), "found_pairs": len(found),
        "planted_pair_recall": round(len(found & truth) / max(1, len(truth)), 4),
        "planted_pair_precision": round(len(found & truth) / max(1, len(found)), 4),
        "index_build_s": round(build_s, 1), "dedup_s": round(run["seconds"], 1),
        "peak_rss_mb": round(run["peak_rss_mb"]), "vectors_mb": round(vectors_mb),
        "peak_rss_over_vectors": round(run["peak_rss_mb"] / vectors_mb, 2),
        "rejected_by_recheck": run["stats"].get("embedding_rejected_by_recheck"),
        "search": run["stats"].get("search"),
        "machine": platform.machine(),
    }
    if args.check_exact:
        exact = exact_pairs(vectors, args.threshold)
        figures["exact_pairs"] = len(exact)
        figures["pair_recall_vs_exact"] = round(len(found & exact) / max(1, len(exact)), 4)
        figures["pair_precision_vs_exact"] = round(len(found & exact) / max(1, len(found)), 4)
    print(json.dumps(figures, indent=1))
    append_result(args.results, figures)


if __name__ == "__main__":
    main()
