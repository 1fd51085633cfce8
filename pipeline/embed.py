"""The embedding job: plan shards, skip the done ones, decode in workers (or in lanes on a CPU),
embed, write parts.

Each shard is a pure function of (shard, config) -> part; the job can be killed at any
point and rerun with the same command, and only the unfinished shards are redone.
"""
from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow
import timm
import torch

from imgindex.progress import progress_bar
from imgindex.pipeline.config import ConfigError, EmbedConfig, check_lanes
from imgindex.pipeline.decode import DECODE_MODE, build_preprocess, describe_preprocess, draft_side
from imgindex.pipeline.lanes import auto_lanes, embed_in_lanes
from imgindex.pipeline.loader import ROW_FIELDS, Batch, ShardBatches, ShardDone, auto_workers, available_cores, make_loader
from imgindex.pipeline.model import Backbone, auto_batch_size, load_backbone
from imgindex.pipeline.sources import Shard, plan_shards
from imgindex.pipeline.writer import EmbeddingStore

log = logging.getLogger(__name__)

FORMAT = "imgindex.embeddings/1"


@dataclass
class Summary:
    out: str
    shards_total: int
    shards_skipped: int = 0
    shards_done: int = 0
    images: int = 0
    failed: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0  # of `seconds`, spent in the model's forward (and the copies around it)
    random_weights: bool = False
    failures_by_error: dict[str, int] = field(default_factory=dict)
    near_constant: int = 0  # embedded images of (almost) one colour

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = (f"embedded {self.images} images ({self.failed} failed) from {self.shards_done} shards "
                f"in {self.seconds:.1f} s, {self.images_per_s:.1f} images/s")
        if self.seconds > 0:
            text += f", model busy {self.model_seconds / self.seconds:.0%} of the time"
        if self.shards_skipped:
            text += f"; {self.shards_skipped} shards already done"
        if self.failures_by_error:
            text += " [failures: " + ", ".join(f"{k}={v}" for k, v in sorted(self.failures_by_error.items())) + "]"
        if self.near_constant:
            text += f" [{self.near_constant} near-constant images: embedded, but (almost) one colour]"
        text += f" -> {self.out}"
        if self.random_weights:
            text += "  WARNING: random weights, embeddings are meaningless"
        return text


def build_manifest(config: EmbedConfig, backbone: Backbone) -> dict:
    """Everything needed to know, and reproduce, how the vectors were made."""
    cfg = backbone.model.pretrained_cfg
    return {
        "format": FORMAT,
        "model": {"name": backbone.name, "architecture": cfg.get("architecture"), "tag": cfg.get("tag"),
                  "num_classes": 0, "pooled": True},
        "weights": backbone.weights,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()},
        "preprocess": describe_preprocess(backbone.data_config),
        "dim": backbone.dim,
        "dtype": "float32",
        "normalized": backbone.normalize,
        "precision": backbone.precision,
        "decode": {"mode": DECODE_MODE, "max_pixels": config.decode.max_pixels,
                   "alpha_background": list(config.decode.alpha_background), "draft": config.decode.draft},
        "device": str(backbone.device),
        "config": config.to_dict(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "timm": timm.__version__, "pyarrow": pyarrow.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def parse_slice(text: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n): this process takes shards i, i+n, ... (SLURM arrays, one process per GPU)."""
    if not text:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--slice must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--slice {text}: need 0 <= i < n")
    return index, count


class _ShardBuffer:
    """Rows and vectors of one shard, kept until its ShardDone arrives."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {name: [] for name in ROW_FIELDS}
        self.vectors: list[np.ndarray] = []

    def add(self, batch: Batch, vectors: np.ndarray) -> None:
        for name in ROW_FIELDS:
            self.rows[name].extend(batch.rows[name])
        self.vectors.append(vectors)

    def embeddings(self, dim: int) -> np.ndarray:
        return np.concatenate(self.vectors) if self.vectors else np.zeros((0, dim), np.float32)


def run_embed(sources: list[str], out: str, config: EmbedConfig, overwrite: bool = False,
              slice_: str | None = None, progress: bool | None = None) -> Summary:
    """Embed every shard of `sources` into `out`. Bad job inputs raise ConfigError before any work."""
    shards = plan_shards(sources, config.source)
    part = parse_slice(slice_)
    if part:
        shards = shards[part[0]::part[1]]
    store = EmbeddingStore(out)
    store.check_writable()
    backbone = load_backbone(config)
    resolve_auto(config, backbone)
    store.prepare(build_manifest(config, backbone), overwrite=overwrite)

    done = store.done_shards()
    todo = [s for s in shards if s.name not in done]
    summary = Summary(out=out, shards_total=len(shards), shards_skipped=len(shards) - len(todo),
                      random_weights=backbone.weights.get("source") == "random")
    if not todo:
        return summary
    _embed_shards(todo, store, config, backbone, summary, progress)
    return summary


def resolve_auto(config: EmbedConfig, backbone: Backbone) -> None:
    """`auto` batch size, workers and lanes -> this machine's numbers, written into the config
    (and so into the manifest)."""
    runtime = config.runtime
    if runtime.batch_size == "auto":
        runtime.batch_size = auto_batch_size(backbone)
        log.info("batch size %d (auto)", runtime.batch_size)
    if runtime.workers == "auto":
        runtime.workers = auto_workers(backbone.device.type, available_cores())
        log.info("%d decode worker processes (auto)", runtime.workers)
    check_lanes(runtime.lanes, backbone.device.type, runtime.workers, runtime.compile)
    if runtime.lanes == "auto":
        in_process_cpu = backbone.device.type == "cpu" and runtime.workers == 0
        runtime.lanes = auto_lanes(torch.get_num_threads()) if in_process_cpu and not runtime.compile else 1
        log.info("%d lanes (auto)", runtime.lanes)


def _embed_shards(todo: list[Shard], store: EmbeddingStore, config: EmbedConfig, backbone: Backbone,
                  summary: Summary, progress: bool | None) -> None:
    in_process = config.runtime.workers == 0
    threads = torch.get_num_threads()
    dataset = ShardBatches(todo, build_preprocess(backbone.data_config), config.decode, config.runtime.batch_size,
                           draft_side(config.decode, backbone.data_config),
                           decode_threads=threads if in_process else 1, read_timeout=config.source.read_timeout_s)
    if config.runtime.lanes > 1:
        embedded = embed_in_lanes(dataset, backbone, config.runtime.lanes, threads)
    else:
        embedded = _embedded(make_loader(dataset, config.runtime.workers, pin_memory=backbone.device.type == "cuda",
                                         run_ahead=backbone.device.type != "cpu"), backbone)
    sources = {s.name: s for s in todo}
    buffers: dict[str, _ShardBuffer] = {}
    pending: list[Future] = []
    start = time.perf_counter()
    # Counted in images (samples), as the plan knows them for folders and lists; a tar's count is
    # known only once it is read, so with tars the bar counts up without a total.
    known = all(s.kind != "tar" for s in todo)
    bar = progress_bar(total=sum(len(s.files) for s in todo) if known else None, unit="img", desc="embed",
                       progress=progress, smoothing=0.1)
    # closing(): on an error here too, the lanes stop (and are joined) before the writer drains.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer") as writer, closing(embedded):
        for message, vectors, model_seconds in embedded:
            buffer = buffers.setdefault(message.shard, _ShardBuffer())
            if isinstance(message, Batch):
                buffer.add(message, vectors)
                summary.model_seconds += model_seconds
                summary.images += len(message.images)
                elapsed = time.perf_counter() - start
                bar.update(len(message.images))
                bar.set_postfix(shards=f"{summary.shards_done}/{len(todo)}",
                                model_busy=f"{summary.model_seconds / elapsed:.0%}", refresh=False)
                continue
            buffers.pop(message.shard)
            embeddings = buffer.embeddings(backbone.dim)
            stats = _shard_stats(message, sources[message.shard], len(embeddings))
            summary.failed += len(message.failures)
            summary.near_constant += message.near_constant
            for error, count in stats["failures_by_error"].items():
                summary.failures_by_error[error] = summary.failures_by_error.get(error, 0) + count
            pending.append(writer.submit(store.write_shard, message.shard, buffer.rows, embeddings,
                                         message.failures, stats))
            pending = _reap(pending)
            summary.shards_done += 1
            bar.update(len(message.failures))
        for future in pending:
            future.result()
    bar.close()
    summary.seconds = time.perf_counter() - start


def _embedded(loader: Iterable[Batch | ShardDone],
              backbone: Backbone) -> Iterator[tuple[Batch | ShardDone, np.ndarray | None, float]]:
    """(message, its vectors, seconds in the forward) from one loader and the forward here."""
    for message in loader:
        if isinstance(message, Batch):
            began = time.perf_counter()
            vectors = backbone.embed(message.images)
            yield message, vectors, time.perf_counter() - began
        else:
            yield message, None, 0.0


def _reap(pending: list[Future]) -> list[Future]:
    """Surface a write error as soon as it happens, not at the end of the job."""
    still = []
    for future in pending:
        if future.done():
            future.result()
        else:
            still.append(future)
    return still


def _shard_stats(done: ShardDone, source: Shard, rows: int) -> dict:
    """The stats marker; `seconds` runs from when the shard's reading began to now (its part is
    written next), so images/s is the shard's own rate."""
    seconds = time.time() - done.started
    errors: dict[str, int] = {}
    for failure in done.failures:
        errors[failure["error"]] = errors.get(failure["error"], 0) + 1
    if rows + len(done.failures) != done.samples:
        raise RuntimeError(f"shard {done.shard}: {rows} rows + {len(done.failures)} failures != "
                           f"{done.samples} samples")
    return {"shard": done.shard, "kind": source.kind, "source": source.url, "samples": done.samples, "rows": rows,
            "failures": len(done.failures), "failures_by_error": errors, "near_constant": done.near_constant,
            "skipped_members": done.skipped,
            "seconds": round(seconds, 3), "decode_seconds": round(done.decode_seconds, 3),
            "images_per_s": round(rows / seconds, 2) if seconds > 0 else None,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
