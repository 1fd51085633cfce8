"""Run the embedding job as N Ray tasks over disjoint slices of the shards (`--ray N`).

Each task runs the ordinary job on its slice (`run_embed` with slice k/N, one GPU per task
when the device is CUDA) and writes its parts straight into OUT, so OUT must be storage
every node reaches: a shared filesystem or an fsspec URL (s3://, gs://). The cluster is the
one at RAY_ADDRESS, or a local Ray started for the run. A task that fails leaves only its
own shards undone, and rerunning the command finishes them (done shards are skipped).
"""
from __future__ import annotations

import sys
import time

from imgindex.pipeline.config import ConfigError, EmbedConfig
from imgindex.pipeline.processes import prepare_slices, report, wants_gpu


def embed_slice(sources: list[str], out: str, config: EmbedConfig, slice_: str) -> str:
    """The task body: one slice of the job, on whichever node Ray placed it; its summary line."""
    from imgindex.pipeline.embed import run_embed

    return run_embed(sources, out, config, slice_=slice_, progress=False).line()


def run_ray(sources: list[str], out: str, config: EmbedConfig, count: int, overwrite: bool) -> int:
    """Check the inputs once, clear OUT once if asked, run `count` tasks and wait for all.
    Returns the number of tasks that failed."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray installed: pip install 'imgindex[ray]'") from None
    shards, store = prepare_slices(sources, out, config, count, overwrite, "--ray")
    started = time.time()
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_gpus=1 if wants_gpu(config) else 0, max_retries=0)(embed_slice)
    pending = [task.remote(sources, out, config, f"{rank}/{count}") for rank in range(count)]
    failed = 0
    for rank, ref in enumerate(pending):
        try:
            print(f"[{rank}/{count}] {ray.get(ref)}")
        except ray.exceptions.RayError as exc:
            failed += 1
            print(f"[{rank}/{count}] FAILED: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
    report(store, shards, count, "Ray tasks", time.time() - started, failed)
    return failed
