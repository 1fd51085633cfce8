"""An index opened for images: the one place that composes the index side (indexes.query, which
searches vectors and keys) with the pipeline side (pipeline.query_embedder: an image -> the vector
the index's manifest says its model makes). The command line and the service open indexes here.
"""
from __future__ import annotations

import functools
from pathlib import Path

from imgindex.indexes.query import Searcher


def open_searcher(index_dir: str | Path, device: str | None = None, checkpoint: str | None = None,
                  **options) -> Searcher:
    """A Searcher whose image queries (and dedup's calibration) use the model the index records,
    loaded on first use on `device` (default: as schedule.decide picks), from `checkpoint` if the
    weights file moved. `options`: the Searcher's own (params, model, mmap)."""
    from imgindex.pipeline.query_embedder import ImageEmbedder

    return Searcher(index_dir, image_model=functools.partial(ImageEmbedder, device=device, checkpoint=checkpoint),
                    **options)
