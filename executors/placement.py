"""Which pool a command runs its tasks on, and each worker's share: the executor the command line
asked for (in this process, `--procs N` or `--ray N|auto`), placed on this machine or cluster.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from imgindex.errors import ConfigError
from imgindex.executors.handout import Event, Outcome, Pool, WorkerFactory
from imgindex.executors.local import LocalPool
from imgindex.executors.processes import ProcessPool, visible_gpus
from imgindex.executors.ray_actors import PLACEMENT_TIMEOUT_S, RayPool, connect, plan_actors


@dataclass(frozen=True)
class Executor:
    """How the tasks run: `local` (this process), `procs` (N local processes) or `ray` (N actors,
    or auto: as many as the cluster holds); a task whose worker died or raised is handed out
    again up to `retries` times (in this process an error stops the run)."""

    kind: str = "local"
    count: int | str = 1
    retries: int = 2
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S

    @classmethod
    def from_flags(cls, procs: int | None = None, ray: int | str | None = None, retries: int = 2) -> "Executor":
        if procs and ray:
            raise ConfigError("--ray and --procs do not mix: each runs the tasks its own way")
        if ray:
            return cls("ray", ray, retries)
        if procs:
            return cls("procs", procs, retries)
        return cls("local", 1, retries)

    @property
    def flag(self) -> str:
        return {"procs": f"--procs {self.count}", "ray": f"--ray {self.count}"}.get(self.kind, "in-process")

    @property
    def worker_word(self) -> str:
        """One worker, as warnings name it."""
        return {"procs": "process", "ray": "Ray actor"}.get(self.kind, "worker")

    def warn(self, event: Event, outcome: Outcome, task: str = "shard") -> None:
        """Say on stderr that a worker died, failed a task or was never placed (and was given up)."""
        if event.kind in ("died", "failed", "unplaced"):
            held = f" {task} {event.shard}:" if event.shard else ""
            given_up = f"; given up, the others take its {task}s" if event.worker in outcome.given_up else ""
            print(f"imgindex: warning: {self.worker_word} {event.worker}:{held} {event.error}{given_up}",
                  file=sys.stderr)


@dataclass
class Placement:
    """The executor placed: how many workers, and what each one has (cores; GPU ids for local
    processes, a GPU count for Ray actors)."""

    executor: Executor
    workers: int
    cores: int
    on_gpu: bool
    gpu_ids: list[str] = field(default_factory=list)
    ray: object = None

    def pool(self, factory: WorkerFactory, label: str = "Task", threads: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> Pool:
        """A fresh pool of these workers, each made by `factory` in its own process. `threads`:
        the OMP_NUM_THREADS of a local CPU process; `progress`: the in-process worker's callback."""
        if self.executor.kind == "procs":
            return ProcessPool(factory, self.workers, self.gpu_ids if self.on_gpu else [], threads)
        if self.executor.kind == "ray":
            return RayPool(self.ray, factory, label, cpus=self.cores, gpus=1 if self.on_gpu else 0,
                           placement_timeout=self.executor.placement_timeout_s)
        return LocalPool(factory, progress=progress)


def place(executor: Executor, cores: int, gpus: int, want_gpu: bool | None) -> Placement:
    """Place `executor` given this machine's `cores` and `gpus` (for local processes) and whether
    the workers run on a GPU: True, False, or None for "if there is one" (on Ray: on the
    cluster). Raises ConfigError when the workers cannot be placed at all."""
    if executor.kind == "local":
        return Placement(executor, 1, cores, bool(gpus) if want_gpu is None else want_gpu)
    if executor.kind == "procs":
        count = int(executor.count)
        on_gpu = bool(gpus) if want_gpu is None else want_gpu
        ids = visible_gpus(gpus) if on_gpu else []
        if on_gpu and gpus and count > len(ids):  # (no GPU at all: the schedule says what to do)
            raise ConfigError(f"--procs {count} asks for more processes than the {len(ids)} visible GPUs")
        return Placement(executor, count, max(1, cores // count), on_gpu, ids)
    ray = connect()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cluster_gpus = sum(int((n.get("Resources") or {}).get("GPU", 0)) for n in nodes)
    on_gpu = cluster_gpus > 0 if want_gpu is None else want_gpu
    plan = plan_actors(nodes, executor.count, on_gpu)
    sizes = ", ".join(f"{int((n.get('Resources') or {}).get('CPU', 0))} CPU"
                      + (f" {int(n['Resources']['GPU'])} GPU" if (n.get("Resources") or {}).get("GPU") else "")
                      for n in nodes)
    gpu_text = " and 1 GPU" if on_gpu else ""
    if plan.count == 0:
        raise ConfigError(f"--ray {executor.count}: the Ray cluster's {len(nodes)} alive nodes ({sizes or 'none'}) "
                          f"have no room for one actor of {plan.cpus} CPU{gpu_text}: add nodes "
                          "(`ray status` shows what the cluster has)")
    if executor.count != "auto" and plan.count < int(executor.count):
        print(f"imgindex: --ray {executor.count}: the cluster's nodes ({sizes}) hold {plan.holds} actors of "
              f"{plan.cpus} CPU{gpu_text} each; starting {plan.count}", file=sys.stderr)
    return Placement(executor, plan.count, plan.cpus, on_gpu, ray=ray)
