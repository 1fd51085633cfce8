"""The executors on the same shards, one run: Ray actor pool vs local process pool vs the
in-process job, at equal parallelism, with the fixed start-up apart from the steady state.

    python benchmarks/distribution.py [--shards 16] [--per-shard 64] [--workers 2] [--results results.jsonl]

Each executor embeds the same tar shards (real-size JPEGs, random-init XCiT-Nano) through the
command line. Steady-state images/s come from the stats markers: the shards' own seconds (from
first read to written), summed per worker, so Ray's start, the interpreters' imports and the
model loads fall outside them; start-up is the wall time less that steady time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar
from results import append_result


def corpus(folder: Path, shards: int, per_shard: int) -> list[str]:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).resize((500, 375))
    tars = []
    for s in range(shards):
        members = [(f"{s:03d}{i:04d}.jpg", jpeg_bytes(base.rotate(i + s), quality=85)) for i in range(per_shard)]
        tars.append(str(write_tar(folder / f"bench-{s:05d}.tar", members)))
    return tars


def run(tars: list[str], out: Path, extra: list[str], workers: int, checkpoint: Path) -> dict:
    cmd = [sys.executable, "-m", "imgindex", "embed", *tars, "--out", str(out), "--config", "cpu",
           "--checkpoint", str(checkpoint), "--no-progress", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                   if k != "RAY_ADDRESS"})
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    stats = [json.loads(p.read_text()) for p in (out / "_stats").glob("*.json")]
    rows = sum(s["rows"] for s in stats)
    steady = sum(s["seconds"] for s in stats) / workers
    return {"wall_s": round(wall, 2), "steady_s": round(steady, 2), "startup_s": round(wall - steady, 2),
            "steady_images_per_s": round(rows / steady, 1), "rows": rows,
            "workers_seen": len({s.get("worker") for s in stats})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="actors / processes; the in-process job gets as "
                                                               "many lanes")
    parser.add_argument("--results", metavar="FILE")
    args = parser.parse_args()
    import timm
    import torch
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(prefix="imgindex-dist-bench-"))
    (work / "corpus").mkdir()
    tars = corpus(work / "corpus", args.shards, args.per_shard)
    checkpoint = work / "nano.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("xcit_nano_12_p16_224").state_dict().items()},
              str(checkpoint))
    results = {
        "in_process": run(tars, work / "local", ["--lanes", str(args.workers)], 1, checkpoint),
        "procs": run(tars, work / "procs", ["--procs", str(args.workers)], args.workers, checkpoint),
        "ray": run(tars, work / "ray", ["--ray", str(args.workers)], args.workers, checkpoint),
    }
    for name, figures in results.items():
        print(name, json.dumps(figures))
    ray, local, procs = (results[k]["steady_images_per_s"] for k in ("ray", "in_process", "procs"))
    figures = {"benchmark": "distribution", "shards": args.shards, "per_shard": args.per_shard,
               "workers": args.workers, **results,
               "ray_over_in_process_steady": round(ray / local, 3), "ray_over_procs_steady": round(ray / procs, 3),
               "procs_over_in_process_steady": round(procs / local, 3)}
    print(f"steady state: ray / in-process = {figures['ray_over_in_process_steady']}, ray / procs = "
          f"{figures['ray_over_procs_steady']}; start-up: ray {results['ray']['startup_s']} s, procs "
          f"{results['procs']['startup_s']} s, in-process {results['in_process']['startup_s']} s")
    append_result(args.results, figures)


if __name__ == "__main__":
    main()
