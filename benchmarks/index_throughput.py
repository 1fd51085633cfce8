"""Index builder and query module vs raw faiss, same factory string and parameters, one run.

    python benchmarks/index_throughput.py [--count 200000] [--dim 768] [--results results.jsonl]

Writes a clustered synthetic embeddings directory, then measures:
- build: `imgindex index` (streams Parquet, samples, trains, adds, measures recall, tunes) vs raw
  faiss (read the same Parquet into memory, index_factory, train on the same sample size, add, write);
- queries/s: Searcher.search (the batch API: hits with shard and key) vs index.search, same nprobe,
  both in RAM (Searcher(mmap=False)); memory-mapped queries/s too;
  and Searcher.search_vectors (Hit objects with caption/url/path read from the parts) for reference;
- recall@10 of the built index, recomputed here by brute force;
- load + first query of the saved index in a fresh process (memory-mapped).
Prints the figures and the ratios, and appends them as one JSON line to --results.
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

import faiss
import numpy as np
import pyarrow.parquet as pq


from imgindex.indexes.build import BuildOptions, build_index  # noqa: E402
from imgindex.indexes.factory import set_knob  # noqa: E402
from imgindex.indexes.query import Searcher  # noqa: E402
from synthetic import clustered_vectors, write_embeddings_dir  # noqa: E402
from results import append_result  # noqa: E402

LOAD_SNIPPET = """
import sys, time, numpy as np
t0 = time.perf_counter()
from imgindex.indexes.query import Searcher
t1 = time.perf_counter()
s = Searcher(sys.argv[1])
hits = s.search(np.load(sys.argv[2]), k=10)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def raw_faiss_build(emb_dir: Path, key: str, dim: int, train_size: int, seed: int) -> tuple[faiss.Index, float]:
    start = time.perf_counter()
    vectors = np.concatenate([
        pq.read_table(p, columns=["embedding"]).column("embedding").combine_chunks().flatten().to_numpy()
        .reshape(-1, dim) for p in sorted((emb_dir / "embeddings").glob("*.parquet"))])
    index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        index.train(vectors[np.sort(rng.choice(len(vectors), train_size, replace=False))])
    index.add(vectors)
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, str(Path(tmp) / "raw.faiss"))
    return index, time.perf_counter() - start


def queries_per_second(search, queries: np.ndarray, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        search(queries)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--workdir", help="keep the data here (default: a temporary folder)")
    parser.add_argument("--results", help="append a JSON line of the figures to this file")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgindex-bench-"))
    emb, idx = work / "emb", work / "idx"
    print(f"writing {args.count:,} x {args.dim} clustered vectors to {emb}")
    vectors = clustered_vectors(args.count, args.dim, clusters=max(100, args.count // 20), spread=1.0, seed=0)
    if not (emb / "_manifest.json").exists():
        write_embeddings_dir(str(emb), vectors, shard_size=50_000)

    start = time.perf_counter()
    manifest = build_index(str(emb), str(idx), BuildOptions(), overwrite=True, progress=False)
    ours_build = time.perf_counter() - start
    key = manifest.factory
    params = manifest.search_params
    print(f"ours: {key} ({manifest.selection}), {ours_build:.1f} s, recall@10 {manifest.recall_at_10:.4f} "
          f"with {params}; timings {manifest.timings}")

    raw, raw_build = raw_faiss_build(emb, key, args.dim, manifest.build["train_size"],
                                     manifest.build["seed"])
    for name, value in params.items():
        set_knob(raw, name, value)
    print(f"raw faiss: {key}, {raw_build:.1f} s")

    rng = np.random.default_rng(1)
    picks = rng.choice(args.count, args.queries, replace=False)
    queries = np.ascontiguousarray(vectors[picks] + rng.standard_normal((args.queries, args.dim)).astype(np.float32)
                                   * (0.5 / np.sqrt(args.dim)))
    searcher = Searcher(idx, mmap=False)  # in RAM, as the raw index is
    ours_qps = queries_per_second(lambda q: searcher.search(q, k=10), queries)
    raw_qps = queries_per_second(lambda q: raw.search(q, 10), queries)
    mmapped = Searcher(idx)
    mmap_qps = queries_per_second(lambda q: mmapped.search(q, k=10), queries)
    hits_qps = queries_per_second(lambda q: searcher.search_vectors(q, k=10), queries[:500], repeat=1)

    exact = np.argsort(-(queries[:500] @ vectors.T), axis=1)[:, :10]
    _, found = searcher.index.search(queries[:500], 10)
    recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]))

    np.save(work / "q.npy", queries[:1])
    load = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, str(idx), str(work / "q.npy")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=True)
    import_s, load_query_s = (float(x) for x in load.stdout.split())

    figures = {
        "benchmark": "index_throughput", "count": args.count, "dim": args.dim, "factory": key,
        "search_params": params, "ours_build_s": round(ours_build, 2), "raw_build_s": round(raw_build, 2),
        "build_ratio": round(ours_build / raw_build, 3),
        "build_ratio_without_recall": round((ours_build - manifest.timings["ground_truth_s"]
                                             - manifest.timings["tune_s"]) / raw_build, 3),
        "ours_index_work_s": round(manifest.timings["train_s"] + manifest.timings["add_s"], 2),
        "ours_qps": round(ours_qps), "raw_qps": round(raw_qps), "qps_ratio": round(ours_qps / raw_qps, 3),
        "mmap_qps": round(mmap_qps),
        "qps_hits_with_metadata": round(hits_qps), "recall_at_10_manifest": manifest.recall_at_10,
        "recall_at_10_perturbed_queries": round(recall, 4), "load_and_first_query_s": round(load_query_s, 3),
        "import_s": round(import_s, 3), "machine": f"{platform.machine()}, {faiss.omp_get_max_threads()} threads",
        "faiss": faiss.__version__,
    }
    print(json.dumps(figures, indent=1))
    print(f"build_ratio = {figures['build_ratio']}  (ours / raw faiss; ours also measures recall and tunes)")
    print(f"build_ratio_without_recall = {figures['build_ratio_without_recall']}  (same, less the recall measurement)")
    print(f"qps_ratio = {figures['qps_ratio']}  (both in RAM; memory-mapped: {round(mmap_qps)} queries/s)")
    print(f"recall@10 = {figures['recall_at_10_manifest']} (manifest), {recall:.4f} (recomputed, perturbed queries)")
    print(f"load + first query = {load_query_s:.3f} s after imports ({import_s:.2f} s)")
    append_result(args.results, figures)


if __name__ == "__main__":
    main()
