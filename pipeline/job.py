"""The embedding job's driver: plan the shards once, place the executor's workers and decide how
each runs once, write (or check) the manifest once, then hand the shards out on the executor's
pool (this process, `--procs` or `--ray`: executors/), with one bar and one summary.

Each shard is a pure function of (shard, config) -> part (pipeline.shard_job); the job can be
killed at any point and rerun with the same command, and only the unfinished shards are redone.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from imgindex.errors import ConfigError
from imgindex.executors.handout import Event, Outcome, Pool, hand_out
from imgindex.executors.placement import Executor, Placement, place
from imgindex.formats.embeddings_dir import EmbeddingStore
from imgindex.formats.records import EmbeddingsManifest, ModelInfo, ShardStats
from imgindex.pipeline.config import EmbedConfig
from imgindex.pipeline.schedule import Machine, Schedule, decide, machine_facts
from imgindex.pipeline.sources import Shard, plan_shards
from imgindex.plurals import counted
from imgindex.progress import progress_bar

if TYPE_CHECKING:  # torch and timm load only once the inputs are checked: a bad input fails in a second
    from imgindex.pipeline.model import Backbone

log = logging.getLogger(__name__)


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
    retried: int = 0  # shards handed out again (their worker died or raised)
    shards_failed: dict[str, str] = field(default_factory=dict)  # shard -> its last error, after every attempt
    failures_by_error: dict[str, int] = field(default_factory=dict)
    near_constant: int = 0  # embedded images of (almost) one colour
    skipped: dict[str, int] = field(default_factory=dict)  # no samples: tar directories, failed downloads...

    def add(self, stats: ShardStats) -> None:
        """One finished shard's stats marker."""
        self.shards_done += 1
        self.images += stats.rows
        self.failed += stats.failures
        self.near_constant += stats.near_constant
        for error, count in stats.failures_by_error.items():
            self.failures_by_error[error] = self.failures_by_error.get(error, 0) + count
        for reason, count in stats.skipped_members.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = (f"embedded {counted(self.images, 'image')} ({self.failed:,} failed) from "
                f"{counted(self.shards_done, 'shard')} in {self.seconds:.1f} s, {self.images_per_s:.1f} images/s")
        if self.seconds > 0:
            text += f", model busy {self.model_seconds / self.seconds:.0%} of the time"
        if self.shards_skipped:
            text += f"; {counted(self.shards_skipped, 'shard')} already done"
        if self.retried:
            text += f"; {self.retried} shards retried"
        if self.failures_by_error:
            text += " [failures: " + ", ".join(f"{k}={v}" for k, v in sorted(self.failures_by_error.items())) + "]"
        if self.skipped:
            text += " [skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) + "]"
        if self.near_constant:
            text += f" [{counted(self.near_constant, 'near-constant image')}: embedded, but (almost) one colour]"
        text += f" -> {self.out}"
        if self.random_weights:
            text += "  WARNING: random weights, embeddings are meaningless"
        return text


def build_manifest(config: EmbedConfig, backbone: "Backbone", schedule: Schedule) -> EmbeddingsManifest:
    """Everything needed to know, and reproduce, how the vectors were made, and how the job ran."""
    import pyarrow
    import timm
    import torch

    from imgindex.pipeline.decode import DECODE_MODE, describe_preprocess

    cfg = backbone.model.pretrained_cfg
    return EmbeddingsManifest(
        model=ModelInfo(name=backbone.name, architecture=cfg.get("architecture"), tag=cfg.get("tag"), num_classes=0,
                        pooled=True),
        weights=backbone.weights, dim=backbone.dim, normalized=backbone.normalize, precision=schedule.precision,
        decode={"mode": DECODE_MODE, "max_pixels": config.decode.max_pixels,
                "alpha_background": list(config.decode.alpha_background), "draft": config.decode.draft},
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()},
        preprocess=describe_preprocess(backbone.data_config),
        device=schedule.device, schedule=schedule.to_dict(), config=config.to_dict(),
        versions={"python": platform.python_version(), "torch": str(torch.__version__), "timm": timm.__version__,
                  "pyarrow": pyarrow.__version__},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def parse_slice(text: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n): this process takes shards i, i+n, ... (SLURM arrays)."""
    if not text:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--slice must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--slice {text}: need 0 <= i < n")
    return index, count


@dataclass
class Job:
    """The plan, made once by the driver: the shards, the output, where the workers run and how."""

    shards: list[Shard]
    store: EmbeddingStore
    config: EmbedConfig
    schedule: Schedule
    overwrite: bool
    machine: Machine  # the facts of the machine it was planned on (a worker's share is in the schedule)
    placement: Placement

    def finished(self) -> bool:
        """Every planned shard is done, under a manifest made with the same model, weights file,
        preprocessing and precision as asked now: a rerun has nothing to do and loads no model
        to find that out. Anything else takes the usual path, where a change is refused."""
        if self.overwrite:
            return False
        manifest = self.store.read_manifest()
        if manifest is None or not {s.name for s in self.shards} <= self.store.done_shards():
            return False
        return not self._changed_since(manifest)

    def _changed_since(self, manifest: EmbeddingsManifest) -> bool:
        import json

        from imgindex.pipeline.weights import file_sha256

        recorded, now = manifest.config or {}, json.loads(json.dumps(self.config.to_dict()))
        model, weights = self.config.model, manifest.weights
        if any((recorded.get("model") or {}).get(k) != now["model"].get(k)
               for k in ("name", "pretrained", "weights_package", "normalize")):
            return True
        if recorded.get("decode") != now["decode"] or manifest.precision != self.schedule.precision:
            return True
        if model.checkpoint:
            path = Path(model.checkpoint).resolve()
            return (weights.get("path") != str(path) or not path.is_file()
                    or weights.get("file_sha256") != file_sha256(path))
        return bool(recorded.get("model", {}).get("checkpoint"))


def plan_job(sources: list[str], out: str, config: EmbedConfig, overwrite: bool = False,
             slice_: str | None = None, executor: Executor | None = None, machine: Machine | None = None) -> Job:
    """List the shards (once; `--slice` keeps every n-th, with any executor), check OUT can be
    written, place the executor's workers and decide the schedule for one of them; nothing is
    written yet. `--overwrite` with `--slice` is refused: a slice clearing OUT would delete the
    parts other slices finished."""
    executor = executor or Executor()
    device = config.runtime.device
    if executor.kind != "local" and device.startswith("cuda:"):
        raise ConfigError(f"{executor.flag.split()[0]} gives each {executor.worker_word} its own GPU, so --device "
                          f"{device} cannot hold in all of them: use --device cuda (or auto)"
                          + (", and CUDA_VISIBLE_DEVICES to choose the GPUs" if executor.kind == "procs" else ""))
    part = parse_slice(slice_)
    if part and overwrite:
        raise ConfigError(f"--overwrite does not mix with --slice {slice_} (it would delete the parts other slices "
                          f"wrote): clear OUT once first (rm -r {out}, or one `imgindex embed ... --overwrite` "
                          "without --slice), then start the slices")
    shards = plan_shards(sources, config.source)
    if part:
        shards = shards[part[0]::part[1]]
    store = EmbeddingStore(out)
    store.check_writable()
    machine = machine or machine_facts()  # (torch, for the GPUs: only once the inputs are checked)
    want_gpu = {"auto": None, "cuda": True}.get(device, device.startswith("cuda"))
    placement = place(executor, machine.cores, machine.gpus, want_gpu)
    share = machine if executor.kind == "local" else Machine(
        cores=placement.cores, gpus=1 if placement.on_gpu and (machine.gpus or executor.kind == "ray") else 0,
        mps=machine.mps)
    schedule = decide(config.runtime, share)
    if device == "auto" and schedule.device == "cpu":
        log.warning("no CUDA GPU visible: embedding on the CPU in fp32 (slow for large models); "
                    "--device cpu silences this")
    return Job(shards, store, config, schedule, overwrite, machine, placement)


def prepare_output(job: Job, backbone: "Backbone") -> list[Shard]:
    """Check (or write) the manifest, clear OUT if asked: once, in the driver. The shards to do."""
    job.store.prepare(build_manifest(job.config, backbone, job.schedule), overwrite=job.overwrite)
    done = job.store.done_shards()
    return [s for s in job.shards if s.name not in done]


@dataclass(frozen=True)
class EmbedWorkers:
    """The job's worker factory (picklable, made again in every worker process): a Worker, with
    the model loaded once, that writes its shards' parts into OUT."""

    out: str
    config: EmbedConfig
    schedule: Schedule

    def __call__(self, slot: int, name: str):
        from imgindex.pipeline.shard_job import Worker  # torch and timm: only in a worker

        return Worker(self.out, self.config, self.schedule, name=name)


def run_embed(sources: list[str], out: str, config: EmbedConfig, overwrite: bool = False,
              slice_: str | None = None, progress: bool | None = None, executor: Executor | None = None,
              machine: Machine | None = None) -> Summary:
    """Embed every shard of `sources` into `out` on `executor` (default: this process), every
    worker running the same `embed_shard`: plan, manifest, hand-out, one bar and the summary,
    once for every executor. Bad job inputs raise ConfigError before any work; shards that failed
    every attempt on a pool are in `summary.shards_failed`."""
    job = plan_job(sources, out, config, overwrite, slice_, executor, machine)
    executor = job.placement.executor
    summary = Summary(out=job.store.url, shards_total=len(job.shards))
    if job.finished():  # a rerun with nothing to do loads no model and starts no worker
        summary.shards_skipped = len(job.shards)
        return summary
    factory = EmbedWorkers(out, job.config, job.schedule)
    pool = job.placement.pool(factory, label="Embed", threads=job.schedule.threads)
    try:
        if executor.kind == "local":  # the one worker is made now: its model makes the manifest
            worker = pool.open()
            job.schedule = replace(job.schedule, batch_size=worker.batch_size)  # auto on a GPU: probed
            backbone = worker.backbone
        else:  # the manifest from the model on the CPU; the workers load their own
            from imgindex.pipeline.model import load_backbone

            backbone = load_backbone(job.config, replace(job.schedule, device="cpu", precision="fp32",
                                                         compile=False))
        todo = prepare_output(job, backbone)
        summary.shards_skipped = len(job.shards) - len(todo)
        summary.random_weights = backbone.weights.get("source") == "random"
        del backbone
        if not todo:
            pool.stop()
            return summary
        outcome = _hand_out(job, pool, todo, summary, progress)
    except BaseException:
        pool.stop(now=True)
        raise
    summary.retried, summary.shards_failed = outcome.retried, outcome.failed
    return summary


def _hand_out(job: Job, pool: Pool, todo: list[Shard], summary: Summary, progress: bool | None) -> Outcome:
    executor, count = job.placement.executor, min(job.placement.workers, len(todo))
    start = time.perf_counter()
    with image_bar(todo, progress) as bar:
        if pool.reports_progress:  # the in-process worker moves the bar batch by batch
            pool.progress = lambda images, failed: bar.update(images + failed)

        def on_event(event: Event, outcome: Outcome) -> None:
            if event.kind == "done":
                summary.add(event.result)
                if not pool.reports_progress:
                    bar.update(event.result.samples)
            executor.warn(event, outcome)
            postfix = {"shards": f"{summary.shards_done}/{len(todo)}"}
            if executor.kind != "local":
                postfix.update(workers=outcome.alive, retries=outcome.retried)
            bar.set_postfix(**postfix, refresh=False)

        outcome = hand_out(pool, todo, count, executor.retries, on_event)
    summary.seconds = time.perf_counter() - start
    summary.model_seconds = sum(s.model_seconds or 0.0 for s in outcome.done) / count  # the workers' mean
    return outcome


def image_bar(todo: list[Shard], progress: bool | None):
    """A bar counted in samples, as the plan knows them for folders and lists; a tar's count is
    known only once it is read (and a Parquet file's rows may be skipped downloads), so with tars
    and Parquet files the bar counts up without a total."""
    known = all(s.kind in ("folder", "list") for s in todo)
    return progress_bar(total=sum(len(s.files) for s in todo) if known else None, unit="img", desc="embed",
                        progress=progress, smoothing=0.1)
