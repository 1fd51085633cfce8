"""`--ray N`: the job on a Ray actor pool (the cluster at RAY_ADDRESS, or a local Ray).

Each actor holds a Worker (the model, loaded once) and is handed the next shard when it is
free (pipeline.handout): a slow or busy node takes fewer. Parts are written by the actors
straight into OUT, so OUT must be storage every node reaches (a shared filesystem or an fsspec
URL); only shard descriptions and small status records travel through Ray. An actor that dies
(its process, or its node) is replaced and its shard handed to any actor, up to `--retries`
times. Ray is imported only here, when --ray is asked for.
"""
from __future__ import annotations

from imgindex.errors import ConfigError
from imgindex.pipeline.config import EmbedConfig
from imgindex.pipeline.handout import Event
from imgindex.pipeline.schedule import Machine, Schedule, machine_facts
from imgindex.pipeline.sources import Shard


class EmbedActor:
    """A Worker in a Ray actor process."""

    def __init__(self, out: str, config: EmbedConfig, schedule: Schedule, slot: int):
        import os

        from imgindex.pipeline.shard_job import Worker

        self.worker = Worker(out, config, schedule, name=f"ray-{slot}-{os.getpid()}")

    def embed(self, shard: Shard) -> dict:
        return self.worker.embed_shard(shard)


class RayPool:
    """Worker slots as Ray actors; a slot whose actor died is reported dead."""

    def __init__(self, ray, out: str, config: EmbedConfig, schedule: Schedule):
        self.ray, self.out, self.config, self.schedule = ray, out, config, schedule
        gpus = 1 if schedule.device.startswith("cuda") else 0
        # One logical CPU per actor for Ray's placement (the Worker uses schedule.threads): actors
        # that claimed every CPU would leave none for Ray's own tasks (ray#44687).
        self.actor_class = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(EmbedActor)
        self.actors: dict[int, object] = {}
        self.pending: dict[object, tuple[int, str]] = {}

    def start(self, worker: int) -> None:
        self.actors[worker] = self.actor_class.remote(self.out, self.config, self.schedule, worker)

    def submit(self, worker: int, shard: Shard) -> None:
        self.pending[self.actors[worker].embed.remote(shard)] = (worker, shard.name)

    def wait(self) -> list[Event]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        worker, shard = self.pending.pop(ready[0])
        try:
            return [Event("done", worker, shard, stats=self.ray.get(ready[0]))]
        except self.ray.exceptions.RayActorError as exc:
            return [Event("died", worker, shard, error=_last_line(exc))]
        except self.ray.exceptions.RayTaskError as exc:
            return [Event("failed", worker, shard, error=_last_line(exc))]

    def stop(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def run_ray(sources: list[str], out: str, config: EmbedConfig, count: int | str, overwrite: bool,
            retries: int = 2, progress: bool | None = None):
    """Plan once, prepare OUT once, then a pool of actors takes the shards as they free up."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray installed: pip install 'imgindex[ray]'") from None
    from imgindex.pipeline.job import plan_job
    from imgindex.pipeline.processes import run_pool

    if config.runtime.device.startswith("cuda:"):
        raise ConfigError(f"--ray gives each actor its own GPU, so --device {config.runtime.device} cannot hold in "
                          "all of them: use --device cuda (or auto)")
    machine = machine_facts()
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    on_gpu = config.runtime.device.startswith("cuda") or (config.runtime.device == "auto" and gpus > 0)
    if count == "auto":
        count = max(1, gpus) if on_gpu else max(1, cpus // machine.cores)
    # Each actor's share: one GPU, or the cluster's CPUs split between the actors (at most a node's).
    share = Machine(cores=min(machine.cores, max(1, cpus // count)), gpus=1 if on_gpu else 0)
    job = plan_job(sources, out, config, overwrite, machine=share)
    return run_pool(job, lambda: RayPool(ray, out, job.config, job.schedule), count, retries, "Ray actors", progress)
