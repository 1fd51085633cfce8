"""Measured recall: exact neighbours by streaming blocks, leave-one-out recall@k, and the
smallest search setting (nprobe, efSearch) that reaches a target recall.

The evaluation queries are vectors of the corpus itself; each query's own row is dropped
from both the exact and the index answer, so it is measured as a held-out vector would be.
"""
from __future__ import annotations

from collections.abc import Iterable

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from indexes.factory import knob_values, set_knob


def exact_neighbors(queries: np.ndarray, blocks: Iterable[np.ndarray], k: int) -> np.ndarray:
    """Row ids of the exact top-k by inner product, over all blocks in order (global ids)."""
    _, ids = knn_ground_truth(queries, iter(blocks), k, metric_type=faiss.METRIC_INNER_PRODUCT)
    return ids


def drop_self(ids: np.ndarray, query_ids: np.ndarray, k: int) -> list[np.ndarray]:
    return [row[(row != qid) & (row >= 0)][:k] for row, qid in zip(ids, query_ids)]


def recall_at_k(found: np.ndarray, exact: np.ndarray, query_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's exact top-k (self excluded) that the index also returns."""
    hits = 0
    total = 0
    for got, truth in zip(drop_self(found, query_ids, k), drop_self(exact, query_ids, k)):
        hits += len(np.intersect1d(got, truth))
        total += len(truth)
    return hits / total if total else 1.0


def tune(index: faiss.Index, knob: str | None, queries: np.ndarray, query_ids: np.ndarray,
         exact: np.ndarray, target: float, k: int = 10) -> tuple[int | None, float, list[dict]]:
    """Smallest knob value whose recall@k reaches `target` (else the best one tried).

    Returns (value, recall, curve of {knob: value, recall} tried).
    """
    if knob is None:
        _, found = index.search(queries, k + 1)
        return None, recall_at_k(found, exact, query_ids, k), []
    curve = []
    best = (None, -1.0)
    for value in knob_values(index, knob):
        set_knob(index, knob, value)
        _, found = index.search(queries, k + 1)
        recall = recall_at_k(found, exact, query_ids, k)
        curve.append({knob: value, "recall": round(recall, 4)})
        if recall > best[1]:
            best = (value, recall)
        if recall >= target:
            return value, recall, curve
    set_knob(index, knob, best[0])
    return best[0], best[1], curve
