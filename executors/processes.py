"""`--procs N`: a pool of N local worker processes (no cluster needed), for any task.

Each process makes its worker once (the factory: a model, an index's quantizer) and is handed
the next task when it is free (executors.handout). On a GPU box process k sees only GPU k
(CUDA_VISIBLE_DEVICES); each runs on its own share of the cores (its affinity, which its own
child processes inherit). A process that dies is replaced and its task handed out again, up to
the retries. A worker ends when the driver dies, even by SIGKILL (it would otherwise hold its
model, and the resource tracker, forever), and leaves Ctrl-C to the driver, which ends the
workers at once.
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

from imgindex.executors.handout import Event, Task, WorkerFactory


def core_shares(cores: list[int], count: int) -> list[list[int]]:
    """`cores` cut into `count` disjoint runs of near-equal length, one per process; empty
    when there are fewer cores than processes (then the processes share them all)."""
    if len(cores) < count:
        return [[] for _ in range(count)]
    return [cores[k * len(cores) // count:(k + 1) * len(cores) // count] for k in range(count)]


def visible_gpus(count: int) -> list[str]:
    """The ids of the GPUs this process may give its workers: CUDA_VISIBLE_DEVICES, else 0..count-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(count)]


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


def _serve(rank: int, factory: WorkerFactory, cores: list[int], tasks: multiprocessing.Queue,
           events: multiprocessing.Queue, parent: int) -> None:
    """A worker process: its cores, its worker, then tasks until told to stop."""
    end_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the driver ends the workers
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the driver while it started us
    if cores:
        os.sched_setaffinity(0, cores)
    worker = factory(rank, f"proc-{rank}-{os.getpid()}")
    try:
        events.put(Event("ready", rank))
        while (task := tasks.get()) is not None:
            try:
                events.put(Event("done", rank, task.name, result=worker.run(task)))
            except Exception as exc:  # the task's error, handed to the driver (which may retry it)
                events.put(Event("failed", rank, task.name, error=f"{type(exc).__name__}: {exc}"))
    finally:
        worker.close()


class ProcessPool:
    """Worker slots as spawned processes; a slot whose process exited abnormally is reported dead.
    `gpus`: one GPU id per slot (CUDA_VISIBLE_DEVICES), or none; `threads`: the OMP_NUM_THREADS
    of a CPU worker."""

    reports_progress = False

    def __init__(self, factory: WorkerFactory, count: int, gpus: list[str] | None = None, threads: int | None = None):
        self.factory, self.count, self.gpus, self.threads = factory, count, gpus or [], threads
        self.context = multiprocessing.get_context("spawn")
        self.events = self.context.Queue()
        self.tasks: dict[int, multiprocessing.Queue] = {}
        self.processes: dict[int, multiprocessing.Process] = {}
        self.shares = core_shares(_own_cores(), count)

    def start(self, worker: int) -> None:
        self.tasks[worker] = self.context.Queue()
        env = ({"CUDA_VISIBLE_DEVICES": self.gpus[worker]} if self.gpus
               else {"OMP_NUM_THREADS": str(self.threads)} if self.threads else {})
        # a spawned process starts with the parent's environment (and signal mask) of the moment
        with _environment(env), _sigint_blocked():
            process = self.context.Process(target=_serve, name=f"imgindex-worker-{worker}", daemon=True, args=(
                worker, self.factory, self.shares[worker], self.tasks[worker], self.events, os.getpid()))
            process.start()
        self.processes[worker] = process

    def submit(self, worker: int, shard: Task) -> None:
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
