"""Measured recall: exact neighbours by streaming blocks, leave-one-out recall@k, and the
smallest search setting (nprobe, efSearch) that reaches a target recall.

The evaluation queries are vectors of the corpus itself; each query's own row is dropped
from both the exact and the index answer, so it is measured as a held-out vector would be.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from imgindex.indexes.factory import knob_values, set_knob


TIE = 1e-5  # a neighbour this close to the k-th exact similarity is as correct as the k-th
TIE_SLACK = 10  # extra exact neighbours fetched to see such ties


class Exact(NamedTuple):
    scores: np.ndarray  # queries x (k + TIE_SLACK), descending
    ids: np.ndarray


def exact_neighbors(queries: np.ndarray, blocks: Iterable[np.ndarray], k: int) -> Exact:
    """The exact top-k by inner product (plus TIE_SLACK more), over all blocks in order (global ids)."""
    scores, ids = knn_ground_truth(queries, iter(blocks), k + TIE_SLACK, metric_type=faiss.METRIC_INNER_PRODUCT)
    return Exact(scores, ids)


def drop_self(ids: np.ndarray, query_ids: np.ndarray, k: int) -> list[np.ndarray]:
    return [row[(row != qid) & (row >= 0)][:k] for row, qid in zip(ids, query_ids)]


def recall_at_k(found: np.ndarray, exact: Exact, query_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's exact top-k (self excluded) that the index also returns.

    A returned neighbour whose exact similarity ties the k-th's (within TIE) counts as correct:
    which of several equally close vectors come back is float rounding, not a recall loss.
    """
    hits = 0
    total = 0
    for got, ids, scores, qid in zip(drop_self(found, query_ids, k), exact.ids, exact.scores, query_ids):
        mine = (ids != qid) & (ids >= 0)
        ids, scores = ids[mine], scores[mine]
        truth = ids[: k] if len(ids) <= k else ids[scores >= scores[k - 1] - TIE]
        hits += min(len(np.intersect1d(got, truth)), k)
        total += min(len(ids), k)
    return hits / total if total else 1.0


def recall_of_rows(found: np.ndarray, exact: Exact, query_ids: np.ndarray, start: int, end: int,
                   k: int = 10) -> tuple[float | None, int]:
    """Of the queries' exact top-k neighbours (self excluded) that are rows [start, end), the
    share the index returns, and how many such neighbours there were (None: there were none)."""
    hits = total = 0
    for got, ids, qid in zip(drop_self(found, query_ids, k), exact.ids, query_ids):
        truth = ids[(ids != qid) & (ids >= 0)][:k]
        wanted = truth[(truth >= start) & (truth < end)]
        total += len(wanted)
        hits += len(np.intersect1d(got, wanted))
    return (hits / total if total else None), total


def sweep(index: faiss.Index, knob: str, measure: Callable[[], float], target: float) -> tuple[int, float, list[dict]]:
    """The smallest knob value whose `measure()` reaches `target`, else the best one tried (left
    set on the index). Returns (value, measure, curve of {knob: value, "recall": measure})."""
    curve = []
    best = (None, -1.0)
    for value in knob_values(index, knob):
        set_knob(index, knob, value)
        recall = measure()
        curve.append({knob: value, "recall": round(recall, 4)})
        if recall > best[1]:
            best = (value, recall)
        if recall >= target:
            return value, recall, curve
    set_knob(index, knob, best[0])
    return best[0], best[1], curve


def tune(index: faiss.Index, knob: str | None, queries: np.ndarray, query_ids: np.ndarray,
         exact: Exact, target: float, k: int = 10) -> tuple[int | None, float, list[dict]]:
    """Smallest knob value whose recall@k reaches `target` (else the best one tried).

    Returns (value, recall, curve of {knob: value, recall} tried).
    """
    def measure() -> float:
        _, found = index.search(queries, k + 1)
        return recall_at_k(found, exact, query_ids, k)

    if knob is None:
        return None, measure(), []
    return sweep(index, knob, measure, target)
