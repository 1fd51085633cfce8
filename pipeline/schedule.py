"""How a worker runs: one pure function of (runtime config, machine facts) -> Schedule.

The driver decides once and records the decision in the manifest; every executor hands the
same Schedule to its workers, and nothing else re-derives it. The rules, measured on the
2-core CPU host and reasoned for accelerators (README, benchmarks/embed_throughput.py):
- a CPU worker decodes in-process: by default in lanes (threads that each decode a batch
  and run the forward on it with their share of the threads, side by side);
- an accelerator worker decodes in processes, one per core less one for the feeding thread
  (at most MAX_AUTO_WORKERS), and runs two batches ahead per process, in pinned memory;
- torch.compile is not thread-safe (pytorch/pytorch#118260): one lane with --compile.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from imgindex.errors import ConfigError
from imgindex.pipeline.config import RuntimeConfig

MAX_AUTO_WORKERS = 16
MAX_AUTO_LANES = 8  # more lanes each hold a batch's activations and contend for the GIL; beyond, lanes widen


@dataclass(frozen=True)
class Machine:
    """What a worker has: the cores it may use, the CUDA devices it sees, whether MPS (Apple) works."""

    cores: int
    gpus: int
    mps: bool = False


@dataclass(frozen=True)
class Schedule:
    device: str  # cpu, cuda, cuda:N, mps
    precision: str  # fp32, bf16, fp16
    batch_size: int | str  # "auto" on CUDA: the worker probes its GPU once (largest that fits)
    threads: int  # torch threads of the worker
    decode: str  # "lanes", "threads" (taking turns with the forward) or "processes"
    lanes: int  # lanes == 1 unless decode is "lanes"
    workers: int  # decode processes (decode == "processes")
    ahead: int  # batches decoded ahead of the forward
    pin_memory: bool
    compile: bool

    def to_dict(self) -> dict:
        return asdict(self)


CPU_BATCH = 16  # `auto` off CUDA: larger batches fall out of the caches, smaller pay more overhead per batch
# (the benchmark table in benchmarks/README.md has the figures); on CUDA the worker probes the largest that fits


def machine_facts() -> Machine:
    """This process's cores (its affinity mask, which taskset, cgroups and SLURM set) and GPUs."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    mps = getattr(torch.backends, "mps", None)
    return Machine(cores=max(1, cores), gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                   mps=bool(mps and mps.is_available()))


def auto_lanes(threads: int) -> int:
    """One lane per thread of the worker's budget, up to MAX_AUTO_LANES lanes of equal width."""
    width = -(-threads // MAX_AUTO_LANES)
    return max(1, threads // width)


def auto_workers(device: str, cores: int) -> int:
    """Decode processes: none on a CPU (decode shares the cores with the forward); with an
    accelerator one per core less one for the feeding thread, at least 1, at most 16."""
    return 0 if device == "cpu" else max(1, min(MAX_AUTO_WORKERS, cores - 1))


def decide(runtime: RuntimeConfig, machine: Machine) -> Schedule:
    """The Schedule for one worker on `machine` (pure: the same inputs give the same decision)."""
    device = runtime.device
    if device == "auto":
        device = "cuda" if machine.gpus else "cpu"
    if device.startswith("cuda") and not machine.gpus:
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is visible: use --device cpu")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= machine.gpus:
        raise ConfigError(f"device {device!r} asked for, but this machine shows {machine.gpus} CUDA GPU(s) "
                          f"(cuda:0 to cuda:{machine.gpus - 1}): pick one of those")
    if device == "mps" and not machine.mps:
        raise ConfigError("device 'mps' asked for, but this PyTorch has no working MPS (Apple GPU) backend: "
                          "use --device cpu")
    accelerator = device != "cpu"
    precision = runtime.precision if runtime.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    if precision == "fp16" and not accelerator:
        raise ConfigError("fp16 is not supported on CPU: use --precision fp32 or bf16")
    workers = auto_workers(device, machine.cores) if runtime.workers == "auto" else runtime.workers
    threads = machine.cores
    if workers or accelerator:
        decode, lanes = ("processes" if workers else "threads"), 1
    elif runtime.lanes == "auto":
        lanes = 1 if runtime.compile else auto_lanes(threads)
        decode = "lanes" if lanes > 1 else "threads"
    else:
        lanes = runtime.lanes
        decode = "lanes" if lanes > 1 else "threads"
    if lanes > 1 and runtime.compile:
        raise ConfigError(f"--lanes {lanes} does not mix with --compile (a compiled model is not safe to run from "
                          "several threads): use --lanes 1")
    batch = runtime.batch_size if runtime.batch_size != "auto" or device.startswith("cuda") else CPU_BATCH
    return Schedule(device=device, precision=precision, batch_size=batch, threads=threads, decode=decode,
                    lanes=lanes, workers=workers, ahead=2 * max(1, workers) if accelerator else 0,
                    pin_memory=device.startswith("cuda"), compile=runtime.compile)
