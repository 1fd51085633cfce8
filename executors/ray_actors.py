"""`--ray N|auto`: a pool of Ray actors (the cluster at RAY_ADDRESS, or a local Ray), for any task.

Each actor makes its worker once (the factory) and is handed the next task when it is free
(executors.handout): a slow or busy node takes fewer. An actor gets tasks only once Ray placed it
and its worker is made; one that is not placed within PLACEMENT_TIMEOUT_S (the cluster has no
room for it) is given up with a warning, and the others take its share. N is capped at the
actors the cluster's nodes can hold. Workers write their results straight to storage every node
reaches (a shared filesystem or an fsspec URL); only task descriptions and small records travel
through Ray. An actor that dies (its process, or its node) is replaced and its task handed to
any actor, up to the retries. Ray is imported only when --ray is asked for.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from imgindex.errors import ConfigError, install_hint
from imgindex.executors.handout import Event, Task, WorkerFactory

PLACEMENT_TIMEOUT_S = 120.0  # an actor Ray has not placed by then is given up (said on stderr)
TICK_S = 0.5  # the driver wakes at least this often: Ctrl-C and placement deadlines are seen at once


def connect():
    """Ray, connected to the cluster at RAY_ADDRESS (or a local one); the command keeps its clean
    stop on SIGTERM (Ray's own handler would abort the driver)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray installed: {install_hint('ray')}") from None
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    signal.signal(signal.SIGTERM, on_sigterm)
    return ray


class TaskActor:
    """A worker in a Ray actor process. Creating it is light, so `pid` answers as soon as Ray has
    placed the actor; `load` then makes the worker (which may take long: a model download)."""

    def __init__(self, factory: WorkerFactory, slot: int):
        self.factory, self.slot = factory, slot
        self.worker = None

    def pid(self) -> int:
        """This actor's process id: the actor is placed and running."""
        return os.getpid()

    def load(self) -> int:
        """Make the worker; after this the actor takes tasks."""
        self.worker = self.factory(self.slot, f"ray-{self.slot}-{os.getpid()}")
        return os.getpid()

    def run(self, task: Task):
        return self.worker.run(task)


@dataclass(frozen=True)
class ActorPlan:
    """How many actors the job starts and what each asks Ray for (and runs on: `cpus` cores)."""

    count: int
    cpus: int
    gpus: int
    holds: int  # actors of this size the cluster's alive nodes can hold at once


def plan_actors(nodes: list[dict], asked: int | str, on_gpu: bool) -> ActorPlan:
    """Actors per node, from each alive node's own resources (`ray.nodes()`), since an actor
    cannot span nodes: the cluster's total divided by one machine's cores is wrong whenever
    nodes differ from the driver. On GPUs: one actor per GPU, each with its node's cores per
    GPU (the smallest such share, so every GPU node holds one per GPU). On CPUs: `auto` gives
    each actor the cores of the smallest node (one actor per node of that size); N actors get
    the largest equal share of cores that still places all N, or one core each and N capped
    at what the nodes hold."""
    resources = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
    sizes = [(int(r.get("CPU", 0)), int(r.get("GPU", 0))) for r in resources]
    if on_gpu:
        gpu_nodes = [(c, g) for c, g in sizes if g > 0]
        cpus = max(1, min((c // g for c, g in gpu_nodes), default=1))
        holds = sum(min(g, c // cpus) for c, g in gpu_nodes)
        count = holds if asked == "auto" else min(int(asked), holds)
        return ActorPlan(count=count, cpus=cpus, gpus=1, holds=holds)
    cores = [c for c, _ in sizes if c > 0]
    if not cores:
        return ActorPlan(count=0, cpus=1, gpus=0, holds=0)
    if asked == "auto":
        cpus = min(cores)
    else:
        fitting = [t for t in range(1, max(cores) + 1) if sum(c // t for c in cores) >= int(asked)]
        cpus = max(fitting, default=1)
    holds = sum(c // cpus for c in cores)
    count = holds if asked == "auto" else min(int(asked), holds)
    return ActorPlan(count=count, cpus=cpus, gpus=0, holds=holds)


class RayPool:
    """Worker slots as Ray actors. A slot is reported `ready` once its actor answered `pid` (placed)
    and `load` (worker made); `unplaced` when Ray has not placed it within the bound (the actor
    is then killed); `died` when its actor (or its node) died, or its worker could not be made.
    `label` names the actor class as Ray shows it (`ray::EmbedActor`)."""

    reports_progress = False

    def __init__(self, ray, factory: WorkerFactory, label: str = "Task", cpus: int = 1, gpus: int = 0,
                 placement_timeout: float = PLACEMENT_TIMEOUT_S):
        self.ray, self.factory = ray, factory
        self.cpus, self.gpus, self.placement_timeout = cpus, gpus, placement_timeout
        named = type(f"{label}Actor", (TaskActor,), {"__module__": TaskActor.__module__})
        self.actor_class = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(named)
        self.actors: dict[int, object] = {}
        self.calls: dict[object, tuple[int, str, str | None]] = {}  # ref -> (worker, pid|load|run, task)
        self.deadlines: dict[int, float] = {}  # worker not placed yet -> when it is given up

    def start(self, worker: int) -> None:
        actor = self.actor_class.remote(self.factory, worker)
        self.actors[worker] = actor
        self.calls[actor.pid.remote()] = (worker, "pid", None)
        self.calls[actor.load.remote()] = (worker, "load", None)
        self.deadlines[worker] = time.monotonic() + self.placement_timeout

    def submit(self, worker: int, shard: Task) -> None:
        self.calls[self.actors[worker].run.remote(shard)] = (worker, "run", shard.name)

    def wait(self) -> list[Event]:
        events = []
        if self.calls:
            done, _ = self.ray.wait(list(self.calls), num_returns=1, timeout=TICK_S)
            for ref in done:
                events += self._result(ref, *self.calls.pop(ref))
        else:
            time.sleep(TICK_S)
        now = time.monotonic()
        for worker in [w for w, deadline in self.deadlines.items() if now > deadline]:
            self._forget(worker)
            need = f"{self.cpus} CPU" + (f" and {self.gpus} GPU" if self.gpus else "")
            events.append(Event("unplaced", worker, error=(
                f"not placed by Ray within {self.placement_timeout:.0f} s: no node has {need} free for it "
                "(`ray status` lists it under Pending Demands)")))
        return events

    def _result(self, ref, worker: int, what: str, shard: str | None) -> list[Event]:
        try:
            value = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if what == "run":
                return [Event("failed", worker, shard, error=_last_line(exc))]
            self._forget(worker)  # its worker (a model) could not be made: no use keeping it
            return [Event("died", worker, error=f"the worker could not start: {_last_line(exc)}")]
        except self.ray.exceptions.RayError as exc:  # the actor (or its node) died, or cannot be scheduled
            self._forget(worker)
            return [Event("died", worker, shard, error=_last_line(exc))]
        if what == "pid":
            self.deadlines.pop(worker, None)  # placed: from now on only its death or its results count
            return []
        if what == "load":
            return [Event("ready", worker)]
        return [Event("done", worker, shard, result=value)]

    def _forget(self, worker: int) -> None:
        """Kill the slot's actor and drop every call still out to it: it reports nothing more."""
        actor = self.actors.pop(worker, None)
        self.deadlines.pop(worker, None)
        for ref in [r for r, call in self.calls.items() if call[0] == worker]:
            del self.calls[ref]
        if actor is not None:
            self._kill(actor)

    def _kill(self, actor) -> None:
        with contextlib.suppress(Exception):  # already dead, or its node gone: nothing left to stop
            self.ray.kill(actor, no_restart=True)

    def stop(self, now: bool = False) -> None:
        for actor in self.actors.values():
            self._kill(actor)
        self.actors.clear()
        self.calls.clear()


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
