"""`--ray N`: the job on a Ray actor pool (the cluster at RAY_ADDRESS, or a local Ray).

Each actor holds a Worker (the model, loaded once) and is handed the next shard when it is
free (pipeline.handout): a slow or busy node takes fewer. An actor gets shards only once Ray
placed it and it loaded its model; one that is not placed within PLACEMENT_TIMEOUT_S (the
cluster has no room for it) is given up with a warning, and the others take its share. N is
capped at the actors the cluster's nodes can hold. Parts are written by the actors straight
into OUT, so OUT must be storage every node reaches (a shared filesystem or an fsspec URL);
only shard descriptions and small status records travel through Ray. An actor that dies (its
process, or its node) is replaced and its shard handed to any actor, up to `--retries` times.
Ray is imported only here, when --ray is asked for.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass

from imgindex.errors import ConfigError, install_hint
from imgindex.pipeline.config import EmbedConfig
from imgindex.pipeline.handout import Event
from imgindex.pipeline.schedule import Machine, Schedule
from imgindex.pipeline.sources import Shard

PLACEMENT_TIMEOUT_S = 120.0  # an actor Ray has not placed by then is given up (said on stderr)
TICK_S = 0.5  # the driver wakes at least this often: Ctrl-C and placement deadlines are seen at once


class EmbedActor:
    """A Worker in a Ray actor process. Creating it is light, so `pid` answers as soon as Ray has
    placed the actor; `load` then loads the model (which may take long: a download)."""

    def __init__(self, out: str, config: EmbedConfig, schedule: Schedule, slot: int):
        self.out, self.config, self.schedule, self.slot = out, config, schedule, slot
        self.worker = None

    def pid(self) -> int:
        """This actor's process id: the actor is placed and running."""
        return os.getpid()

    def load(self) -> int:
        """Load the Worker (the model); after this the actor takes shards."""
        from imgindex.pipeline.shard_job import Worker

        self.worker = Worker(self.out, self.config, self.schedule, name=f"ray-{self.slot}-{os.getpid()}")
        return os.getpid()

    def embed(self, shard: Shard) -> dict:
        return self.worker.embed_shard(shard)


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
    and `load` (model loaded); `unplaced` when Ray has not placed it within the bound (the actor
    is then killed); `died` when its actor (or its node) died, or its model failed to load."""

    def __init__(self, ray, out: str, config: EmbedConfig, schedule: Schedule, cpus: int = 1, gpus: int = 0,
                 placement_timeout: float = PLACEMENT_TIMEOUT_S):
        self.ray, self.out, self.config, self.schedule = ray, out, config, schedule
        self.cpus, self.gpus, self.placement_timeout = cpus, gpus, placement_timeout
        self.actor_class = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(EmbedActor)
        self.actors: dict[int, object] = {}
        self.calls: dict[object, tuple[int, str, str | None]] = {}  # ref -> (worker, pid|load|embed, shard)
        self.deadlines: dict[int, float] = {}  # worker not placed yet -> when it is given up

    def start(self, worker: int) -> None:
        actor = self.actor_class.remote(self.out, self.config, self.schedule, worker)
        self.actors[worker] = actor
        self.calls[actor.pid.remote()] = (worker, "pid", None)
        self.calls[actor.load.remote()] = (worker, "load", None)
        self.deadlines[worker] = time.monotonic() + self.placement_timeout

    def submit(self, worker: int, shard: Shard) -> None:
        self.calls[self.actors[worker].embed.remote(shard)] = (worker, "embed", shard.name)

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
            if what == "embed":
                return [Event("failed", worker, shard, error=_last_line(exc))]
            self._forget(worker)  # its model did not load: no use keeping it
            return [Event("died", worker, error=f"the model did not load: {_last_line(exc)}")]
        except self.ray.exceptions.RayError as exc:  # the actor (or its node) died, or cannot be scheduled
            self._forget(worker)
            return [Event("died", worker, shard, error=_last_line(exc))]
        if what == "pid":
            self.deadlines.pop(worker, None)  # placed: from now on only its death or its results count
            return []
        if what == "load":
            return [Event("ready", worker)]
        return [Event("done", worker, shard, stats=value)]

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


def run_ray(sources: list[str], out: str, config: EmbedConfig, count: int | str, overwrite: bool,
            retries: int = 2, progress: bool | None = None, placement_timeout: float = PLACEMENT_TIMEOUT_S):
    """Plan once, prepare OUT once, then a pool of actors takes the shards as they free up."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray installed: {install_hint('ray')}") from None
    from imgindex.pipeline.job import plan_job
    from imgindex.pipeline.processes import run_pool

    if config.runtime.device.startswith("cuda:"):
        raise ConfigError(f"--ray gives each actor its own GPU, so --device {config.runtime.device} cannot hold in "
                          "all of them: use --device cuda (or auto)")
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    signal.signal(signal.SIGTERM, on_sigterm)  # Ray's own handler aborts the driver: keep the command's clean stop
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int((n.get("Resources") or {}).get("GPU", 0)) for n in nodes)
    on_gpu = config.runtime.device.startswith("cuda") or (config.runtime.device == "auto" and gpus > 0)
    plan = plan_actors(nodes, count, on_gpu)
    sizes = ", ".join(f"{int((n.get('Resources') or {}).get('CPU', 0))} CPU"
                      + (f" {int(n['Resources']['GPU'])} GPU" if (n.get("Resources") or {}).get("GPU") else "")
                      for n in nodes)
    if plan.count == 0:
        raise ConfigError(f"--ray {count}: the Ray cluster's {len(nodes)} alive nodes ({sizes or 'none'}) have no room "
                          f"for one actor of {plan.cpus} CPU{' and 1 GPU' if on_gpu else ''}: add nodes "
                          "(`ray status` shows what the cluster has)")
    if count != "auto" and plan.count < int(count):
        print(f"imgindex: --ray {count}: the cluster's nodes ({sizes}) hold {plan.holds} actors of {plan.cpus} CPU"
              f"{' and 1 GPU' if on_gpu else ''} each; starting {plan.count}", file=sys.stderr)
    share = Machine(cores=plan.cpus, gpus=1 if on_gpu else 0)
    job = plan_job(sources, out, config, overwrite, machine=share)
    return run_pool(job, lambda: RayPool(ray, out, job.config, job.schedule, cpus=plan.cpus, gpus=plan.gpus,
                                         placement_timeout=placement_timeout),
                    plan.count, retries, "Ray actor", progress)
