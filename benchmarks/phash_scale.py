"""The phash tier's multi-index hashing against faiss's exhaustive IndexBinaryFlat, one run.

    python benchmarks/phash_scale.py [--count 100000] [--distances 4,8,10,12] [--results results.jsonl]

`count` 64-bit hashes: uniform random ones plus planted near copies (5% of the rows, each 0 to
distance+2 bits from a random original). For each distance, ours (multi-index hashing or the
exhaustive scan, whichever `phash_plan` estimates faster) and faiss's exhaustive search find
every pair within it; the script checks that the pairs are identical and prints the method and
the time ratio (exhaustive / ours).
Uniform hashes fill the hash tables' buckets evenly; hashes of real photos cluster, which
makes some buckets fuller, so read the ratio as an upper bound of the gain.
"""
from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from imgindex.indexes.dedup.tiers import _binary_codes, phash_pairs, phash_plan
from results import append_result


def corpus(count: int, max_bits: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.integers(-2**63, 2**63 - 1, count, dtype=np.int64)
    planted = count // 20
    originals = rng.integers(0, count - planted, planted)
    unsigned = values.view(np.uint64)
    for row, original in zip(range(count - planted, count), originals):
        bits = rng.choice(64, rng.integers(0, max_bits + 1), replace=False)
        unsigned[row] = unsigned[original] ^ np.uint64(sum(1 << int(b) for b in bits))
    return values


def exhaustive(values: np.ndarray, distance: int) -> set[tuple[int, int]]:
    codes = _binary_codes(values)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, _, ids = index.range_search(codes, distance + 1)
    rows = np.repeat(np.arange(len(values)), np.diff(lims).astype(np.int64))
    return {(int(a), int(b)) for a, b in zip(rows, ids) if a < b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--distances", default="4,8,10,12")
    parser.add_argument("--results", metavar="FILE", help="append the figures as a JSON line")
    args = parser.parse_args()
    distances = [int(d) for d in args.distances.split(",")]
    values = corpus(args.count, max(distances) + 2)
    valid = np.ones(len(values), bool)
    rows = []
    for distance in distances:
        start = time.perf_counter()
        q, d = phash_pairs((values, valid), distance)
        ours_s = time.perf_counter() - start
        ours = {(int(a), int(b)) for a, b in zip(q, d) if a < b}
        start = time.perf_counter()
        truth = exhaustive(values, distance)
        flat_s = time.perf_counter() - start
        tables, _ = phash_plan(len(values), len(values), distance)
        rows.append({"distance": distance, "method": f"{tables} hash tables" if tables else "exhaustive scan",
                     "pairs": len(truth), "identical_pairs": ours == truth,
                     "ours_s": round(ours_s, 2), "exhaustive_s": round(flat_s, 2),
                     "exhaustive_over_ours": round(flat_s / ours_s, 2)})
        print(json.dumps(rows[-1]))
    append_result(args.results, {"benchmark": "phash_scale", "count": args.count, "rows": rows})


if __name__ == "__main__":
    main()
