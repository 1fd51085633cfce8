"""`--procs N`: the job as a pool of N local worker processes (no cluster needed).

The driver plans, decides the schedule and prepares OUT once; each process holds a Worker
(the model, loaded once) and is handed the next shard when it is free (pipeline.handout). On
a GPU box process k sees only GPU k (CUDA_VISIBLE_DEVICES); each runs on its own share of the
cores (its affinity, which its decode processes inherit). A process that dies is replaced and
its shard handed out again, up to `--retries` times. A worker ends when the driver dies, even
by SIGKILL (it would otherwise hold its model, and the resource tracker, forever), and leaves
Ctrl-C to the driver, which ends the workers at once and says what a local run says.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import replace

from imgindex.errors import ConfigError
from imgindex.pipeline.config import EmbedConfig
from imgindex.pipeline.handout import Event, Outcome, hand_out
from imgindex.pipeline.schedule import Machine, Schedule, worker_share
from imgindex.pipeline.sources import Shard


def core_shares(cores: list[int], count: int) -> list[list[int]]:
    """`cores` cut into `count` disjoint runs of near-equal length, one per process; empty
    when there are fewer cores than processes (then the processes share them all)."""
    if len(cores) < count:
        return [[] for _ in range(count)]
    return [cores[k * len(cores) // count:(k + 1) * len(cores) // count] for k in range(count)]


def visible_gpus(machine: Machine) -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(machine.gpus)]


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 1.0


def end_with_parent(parent: int) -> None:
    """Make this process end when `parent` does: the kernel's parent-death signal on Linux, and a
    thread that watches the parent pid everywhere (a SIGKILLed driver runs no cleanup, and a
    worker blocked on its task queue would otherwise wait forever, reparented to init)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve(rank: int, out: str, config: EmbedConfig, schedule: Schedule, cores: list[int],
           tasks: multiprocessing.Queue, events: multiprocessing.Queue, parent: int) -> None:
    """A worker process: its cores, its Worker, then shards until told to stop."""
    end_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the driver ends the workers
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the driver while it started us
    if cores:
        os.sched_setaffinity(0, cores)
    from imgindex.pipeline.shard_job import Worker

    name = f"proc-{rank}-{os.getpid()}"
    with Worker(out, config, schedule, name=name) as worker:
        events.put(Event("ready", rank))
        while (shard := tasks.get()) is not None:
            try:
                events.put(Event("done", rank, shard.name, stats=worker.embed_shard(shard)))
            except Exception as exc:  # the shard's error, handed to the driver (which may retry it)
                events.put(Event("failed", rank, shard.name, error=f"{type(exc).__name__}: {exc}"))


class ProcessPool:
    """Worker slots as spawned processes; a slot whose process exited abnormally is reported dead."""

    def __init__(self, out: str, config: EmbedConfig, schedule: Schedule, count: int, machine: Machine):
        self.out, self.config, self.schedule, self.count = out, config, schedule, count
        self.context = multiprocessing.get_context("spawn")
        self.events = self.context.Queue()
        self.tasks: dict[int, multiprocessing.Queue] = {}
        self.processes: dict[int, multiprocessing.Process] = {}
        self.shares = core_shares(_own_cores(), count)
        self.gpus = visible_gpus(machine) if schedule.device.startswith("cuda") else []

    def start(self, worker: int) -> None:
        self.tasks[worker] = self.context.Queue()
        env = {"CUDA_VISIBLE_DEVICES": self.gpus[worker]} if self.gpus else {"OMP_NUM_THREADS": str(
            self.schedule.threads)}
        # a spawned process starts with the parent's environment (and signal mask) of the moment
        with _environment(env), _sigint_blocked():
            process = self.context.Process(target=_serve, name=f"imgindex-worker-{worker}", daemon=True, args=(
                worker, self.out, self.config, self.schedule, self.shares[worker], self.tasks[worker], self.events,
                os.getpid()))
            process.start()
        self.processes[worker] = process

    def submit(self, worker: int, shard: Shard) -> None:
        self.tasks[worker].put(shard)

    def wait(self) -> list[Event]:
        while True:
            try:
                return [self.events.get(timeout=0.5)]
            except queue.Empty:
                died = []
                for worker in [w for w, p in self.processes.items() if not p.is_alive()]:
                    code = self.processes.pop(worker).exitcode
                    self.tasks.pop(worker).close()
                    died.append(Event("died", worker, error=f"worker process exited with code {code}"))
                if died:
                    return died

    def stop(self, now: bool = False) -> None:
        """Done: each worker is told to stop after its shard. Interrupted (`now`): the workers are
        terminated at once; their shards are left unfinished, for the rerun."""
        if now:
            for process in self.processes.values():
                with contextlib.suppress(Exception):
                    process.terminate()
        else:
            for tasks in self.tasks.values():
                with contextlib.suppress(Exception):
                    tasks.put(None)
        for process in self.processes.values():
            process.join(timeout=5 if now else 60)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


def run_processes(sources: list[str], out: str, config: EmbedConfig, count: int, overwrite: bool,
                  retries: int = 2, progress: bool | None = None):
    """Plan once, prepare OUT once, then `count` worker processes take the shards as they free up."""
    from imgindex.pipeline.job import plan_job

    if config.runtime.device.startswith("cuda:"):
        raise ConfigError(f"--procs gives each process its own GPU, so --device {config.runtime.device} cannot hold "
                          "in all of them: use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    job = plan_job(sources, out, config, overwrite, share=lambda facts: worker_share(facts, count))
    machine = job.machine
    if job.schedule.device.startswith("cuda") and count > len(visible_gpus(machine)):
        raise ConfigError(f"--procs {count} asks for more processes than the {len(visible_gpus(machine))} visible GPUs")
    return run_pool(job, lambda: ProcessPool(out, job.config, job.schedule, count, machine), count, retries,
                    "process", progress)


def run_pool(job, make_pool, count: int, retries: int, what: str, progress: bool | None):
    """The driver's part for any pool: the manifest (from the model loaded on the CPU), the
    handout, one bar over all shards, and the summary. `what` names one worker in warnings
    ("process", "Ray actor"). Returns (Summary, Outcome)."""
    from imgindex.pipeline.job import Summary, image_bar, prepare_output
    from imgindex.pipeline.model import load_backbone

    if job.finished():  # a rerun with nothing to do loads no model and starts no worker
        return Summary(out=job.store.url, shards_total=len(job.shards), shards_skipped=len(job.shards)), Outcome()
    backbone = load_backbone(job.config, replace(job.schedule, device="cpu", precision="fp32", compile=False))
    todo = prepare_output(job, backbone)
    summary = Summary(out=job.store.url, shards_total=len(job.shards), shards_skipped=len(job.shards) - len(todo),
                      random_weights=backbone.weights.get("source") == "random")
    del backbone
    if not todo:
        return summary, Outcome()
    if count > len(todo):
        count = len(todo)
    start = time.perf_counter()
    with image_bar(todo, progress) as bar:
        def on_event(event: Event, outcome: Outcome) -> None:
            if event.kind == "done":
                summary.add(event.stats)
                bar.update(event.stats["samples"])
            elif event.kind in ("died", "failed", "unplaced"):
                held = f" shard {event.shard}:" if event.shard else ""
                given_up = "; given up, the others take its shards" if event.worker in outcome.given_up else ""
                print(f"imgindex: warning: {what} {event.worker}:{held} {event.error}{given_up}", file=sys.stderr)
            bar.set_postfix(shards=f"{summary.shards_done}/{len(todo)}", workers=outcome.alive,
                            retries=outcome.retried, refresh=False)

        outcome = hand_out(make_pool(), todo, count, retries, on_event)
    summary.seconds = time.perf_counter() - start
    summary.model_seconds = sum(s.get("model_seconds", 0.0) for s in outcome.done) / count  # the workers' mean
    return summary, outcome


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT held back (not lost) in this thread while a worker starts: the worker inherits the
    mask, so a Ctrl-C during its start-up is not a traceback in it; the driver gets it after."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _own_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return []
