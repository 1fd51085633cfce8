"""Run the embedding job as N processes on one machine, each over a disjoint slice of the
shards (`--slice k/N`): one process per GPU, with no cluster scheduler.

Process k sees only GPU k (CUDA_VISIBLE_DEVICES), so each runs the ordinary single-device
job, and runs on its own share of the cores (its affinity), which its decode workers inherit
and `workers: auto` counts; on a CPU-only machine the share also sets its thread count.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import torch

from imgindex.pipeline.config import ConfigError, EmbedConfig
from imgindex.pipeline.loader import available_cores, own_cores
from imgindex.pipeline.sources import plan_shards
from imgindex.pipeline.writer import EmbeddingStore


def wants_gpu(config: EmbedConfig) -> bool:
    return config.runtime.device.startswith("cuda") or (config.runtime.device == "auto" and torch.cuda.is_available())


def core_shares(cores: list[int], count: int) -> list[list[int]]:
    """`cores` cut into `count` disjoint runs of near-equal length, one per process; empty
    when there are fewer cores than processes (then the processes share them all)."""
    if len(cores) < count:
        return [[] for _ in range(count)]
    return [cores[k * len(cores) // count:(k + 1) * len(cores) // count] for k in range(count)]


def _child_env(rank: int, count: int, config: EmbedConfig, share: list[int]) -> dict[str, str]:
    env = dict(os.environ)
    if wants_gpu(config):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if count > len(gpus):
            raise ConfigError(f"--procs {count} asks for more processes than the {len(gpus)} visible GPUs")
        env["CUDA_VISIBLE_DEVICES"] = gpus[rank]
    else:
        threads = len(share) or max(1, available_cores() // count)
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def prepare_slices(sources: list[str], out: str, config: EmbedConfig, count: int, overwrite: bool,
                   flag: str) -> tuple[list, EmbeddingStore]:
    """Before any slice starts: plan the shards and check OUT once, and clear it once if asked."""
    if config.runtime.device.startswith("cuda:"):
        raise ConfigError(f"{flag} gives each process its own GPU, so --device {config.runtime.device} cannot hold "
                          "in all of them: use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    shards = plan_shards(sources, config.source)
    if count > len(shards):
        raise ConfigError(f"{flag} {count} is more than the {len(shards)} shards to share out")
    store = EmbeddingStore(out)
    store.check_writable()
    if overwrite:
        store.clear()
    return shards, store


def report(store: EmbeddingStore, shards: list, count: int, what: str, seconds: float, failed: int) -> None:
    """One line over all slices, from the stats markers they wrote."""
    stats = store.read_stats()
    rows = sum(s["rows"] for s in stats)
    bad = sum(s["failures"] for s in stats)
    print(f"{count} {what}: {len(stats)} of {len(shards)} shards done in {store.url}, {rows} images "
          f"({bad} failed), {seconds:.1f} s" + (f"; {failed} {what} FAILED (rerun to finish)" if failed else ""))


def run_processes(argv: list[str], sources: list[str], out: str, config: EmbedConfig, count: int,
                  overwrite: bool) -> int:
    """Check the inputs once, clear OUT once if asked, then run `count` slices and wait for all.

    `argv` is the embed command line without --procs/--overwrite; each child gets --slice k/N.
    Returns the number of processes that failed.
    """
    shards, store = prepare_slices(sources, out, config, count, overwrite, "--procs")
    started = time.time()
    children = []
    shares = core_shares(own_cores(), count)
    for rank, share in enumerate(shares):
        cmd = [sys.executable, "-m", "imgindex", *argv, "--slice", f"{rank}/{count}", "--no-progress"]
        child = subprocess.Popen(cmd, env=_child_env(rank, count, config, share), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        if share:  # set at once, before the new interpreter starts any thread or worker
            with contextlib.suppress(ProcessLookupError):  # it already exited: its error is reported below
                os.sched_setaffinity(child.pid, share)
        children.append(child)
    failed = 0
    for rank, child in enumerate(children):
        stdout, stderr = child.communicate()
        for line in (stdout + stderr).splitlines():
            print(f"[{rank}/{count}] {line}", file=sys.stdout if child.returncode == 0 else sys.stderr)
        failed += child.returncode != 0
    report(store, shards, count, "processes", time.time() - started, failed)
    return failed
