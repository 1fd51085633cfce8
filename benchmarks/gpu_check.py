"""The one prepared check for a lent GPU machine: correctness on the GPU, then throughput, each
step within a time budget, every figure a JSON line in OUT.

Here (with the registries), once:
    .venv/bin/python benchmarks/gpu_check.py prepare      # wheels for the machine -> benchmarks/wheels/
On the GPU machine (no network; carry benchmarks/wheels):
    python benchmarks/gpu_check.py run --out "$OUT"        # ends within --budget seconds (default 480)
In CI, on a CPU, the same logic with a tiny model and few images:
    python benchmarks/gpu_check.py run --out DIR --dry-run

The device has Python 3.12 with torch (CUDA), timm, torchvision, pyarrow, pillow, safetensors,
tqdm, pyyaml and fsspec; `prepare` downloads what it lacks (webdataset, braceexpand, faiss-cpu;
faiss-gpu's 135 MB wheel is over what can travel) for CPython 3.12 manylinux x86_64, and
imgindex's own wheel. `run` installs them into a folder of its own (no pip index used) and
puts it first on the path. Steps (JSON lines in OUT/gpu_check.jsonl):
  1. correctness: stored vectors of 64 images, bf16 vs fp32 on the GPU (cosine, min) and fp32
     on the GPU vs fp32 on the CPU (max abs difference);
  2. embed_throughput.py for XCiT-L/8 (random init), bf16, batch auto: eager and --compile at
     500x375, and a shorter run at 2048x1536 with and without decode.draft;
  3. `--procs 1` vs in-process on the same GPU (the per-process overhead), and the batch picked;
  4. the index path: build and query 1M x 768 with faiss on the CPU cores (no faiss-gpu here);
plus nvidia-smi and versions. A step that would not fit in what is left of the budget is
recorded as skipped, not run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "benchmarks" / "wheels"
NEEDS = ("webdataset", "braceexpand", "faiss-cpu", "packaging")
MAX_WHEELS_MB = 60  # what travels with the working tree is limited to 64 MiB in all


def prepare(wheels: Path) -> None:
    """Download the wheels the GPU machine lacks, and build imgindex's own."""
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheels), "--only-binary=:all:",
                    "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform",
                    "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "--no-deps", *NEEDS], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True)
    size = sum(p.stat().st_size for p in wheels.glob("*.whl")) / 2**20
    print(f"{len(list(wheels.glob('*.whl')))} wheels, {size:.1f} MB in {wheels}")
    if size > MAX_WHEELS_MB:
        raise SystemExit(f"the wheels are {size:.0f} MB, over the {MAX_WHEELS_MB} MB that can travel")


def install(wheels: Path, target: Path) -> None:
    """The travelling wheels into `target` (first on the path of every step), without an index."""
    found = sorted(str(p) for p in wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"no wheels in {wheels}: run `benchmarks/gpu_check.py prepare` where the registries are")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(target), *found], check=True)


class Check:
    """The steps, their budget and the JSON lines they write."""

    def __init__(self, out: Path, budget: float | None, dry_run: bool, env: dict):
        """`budget` None: no limit (a dry run checks the logic, whatever the machine's speed)."""
        self.out, self.dry_run, self.env = out, dry_run, env
        self.deadline = time.monotonic() + budget if budget is not None else math.inf
        self.lines = out / "gpu_check.jsonl"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, step: str, **figures) -> None:
        line = {"step": step, **figures, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(self.lines, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)

    def python(self, step: str, args: list[str], needs: float) -> dict | None:
        """Run a step's script with at most what is left of the budget; its last JSON object."""
        if self.left() < needs:
            self.record(step, skipped=f"needs about {needs:.0f} s, {self.left():.0f} s left")
            return None
        started = time.monotonic()
        try:
            done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=self.env, cwd=ROOT,
                                  timeout=max(1.0, self.left()) if math.isfinite(self.left()) else None)
        except subprocess.TimeoutExpired:
            self.record(step, error="ran out of the budget")
            return None
        seconds = round(time.monotonic() - started, 1)
        if done.returncode:
            self.record(step, error=done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else
                        f"exit {done.returncode}", seconds=seconds)
            return None
        figures = _last_json(done.stdout)
        self.record(step, seconds=seconds, **(figures or {"stdout": done.stdout[-500:]}))
        return figures


def _last_json(text: str) -> dict | None:
    """The last JSON object a benchmark printed (embed_throughput prints one, indented)."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.startswith("{") else start + 1
    end = text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        return json.loads(text[start:end + 1])
    except ValueError:
        return None


CORRECTNESS = r"""
import json, sys, numpy as np, torch
from PIL import Image
from imgindex.pipeline.config import load_config
from imgindex.pipeline.model import load_backbone
from imgindex.pipeline.decode import build_preprocess, stack_nchw
model, device, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
def image(i):  # structured pictures, not noise: gradients and shapes
    y, x = np.mgrid[0:375, 0:500]
    rgb = np.stack([(x * (i + 1)) % 256, (y * (i + 3)) % 256, ((x + y) * (i % 7 + 1)) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb)
def vectors(device, precision):
    config = load_config(None, {"model.name": model, "model.pretrained": False, "runtime.device": device,
                                "runtime.precision": precision, "runtime.workers": 0})
    backbone = load_backbone(config)
    pre = build_preprocess(backbone.data_config)
    batch = stack_nchw([pre(image(i)) for i in range(count)])
    return np.concatenate([backbone.embed(batch[i:i + 16]) for i in range(0, count, 16)])
fp32 = vectors(device, "fp32")
low = vectors(device, "bf16")
cpu = vectors("cpu", "fp32")
center = fp32.mean(0)
def cos(a, b):
    a, b = a - center, b - center
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
print(json.dumps({"images": count, "model": model, "device": str(device),
                  "bf16_vs_fp32_cosine_min": float((low * fp32).sum(1).min()),
                  "bf16_vs_fp32_centered_cosine_min": float(cos(low, fp32).min()),
                  "gpu_vs_cpu_fp32_max_abs": float(np.abs(fp32 - cpu).max()),
                  "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
"""

PROCS = r"""
import json, subprocess, sys, tempfile, time, re
from pathlib import Path
model, device, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
work = Path(tempfile.mkdtemp())
from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
base = Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8))
shards = [str(write_tar(work / f"p-{s:05d}.tar", [(f"{s}{i:05d}.jpg", jpeg_bytes(base.rotate(i)))
                                                  for i in range(count // 4)])) for s in range(4)]
(work / "random.yaml").write_text("model: {pretrained: false}\n")
out = {}
for name, extra in (("in_process", []), ("procs_1", ["--procs", "1"])):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "imgindex", "embed", *shards, "--out", str(work / name),
                           "--config", str(work / "random.yaml"), "--model", model, "--device", device,
                           "--no-progress"], capture_output=True, text=True, check=True)
    line = done.stdout.strip().splitlines()[-1]
    out[name + "_images_per_s"] = float(re.search(r"([\d.]+) images/s", line).group(1))
    out[name + "_wall_s"] = round(time.perf_counter() - started, 1)
    stats = json.loads(next((work / name / "_stats").glob("*.json")).read_text())
    out[name + "_batch_size"] = stats["batch_size"]
    out[name + "_summary"] = line
out["procs_1_over_in_process"] = round(out["procs_1_images_per_s"] / out["in_process_images_per_s"], 3)
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("prepare", "run"))
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"), help="where the JSON lines go")
    parser.add_argument("--wheels", default=str(WHEELS))
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default 480; no limit with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, few images, CPU: the logic only")
    args = parser.parse_args()
    if args.mode == "prepare":
        prepare(Path(args.wheels))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not args.dry_run:
        site = Path(tempfile.mkdtemp(prefix="imgindex-gpu-check-"))
        install(Path(args.wheels), site)
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    budget = args.budget if args.budget is not None else (None if args.dry_run else 480)
    check = Check(out, budget, args.dry_run, env)
    dry = args.dry_run
    model = "xcit_nano_12_p16_224.fb_in1k" if dry else "xcit_large_24_p8_224.fb_in1k"
    device = "cpu" if dry else "cuda"
    check.record("machine", dry_run=dry, python=platform.python_version(), cpus=os.cpu_count(),
                 nvidia_smi=_nvidia_smi())
    check.python("versions", ["-c", "import json, torch, timm, pyarrow, PIL; print(json.dumps({'torch': "
                              "torch.__version__, 'cuda': torch.version.cuda, 'timm': timm.__version__, 'pyarrow': "
                              "pyarrow.__version__, 'pillow': PIL.__version__, 'gpus': torch.cuda.device_count()}))"],
                 needs=5)
    check.python("correctness", ["-c", CORRECTNESS, model, device, "8" if dry else "64"], needs=10 if dry else 60)
    bench = [str(ROOT / "benchmarks" / "embed_throughput.py"), "--model", model, "--device", device,
             "--batch-size", "8" if dry else "auto", "--repeat", "1"]
    big = "64" if dry else "8192"
    check.python("embed_eager_500x375", [*bench, "--count", big], needs=20 if dry else 120)
    check.python("embed_compile_500x375", [*bench, "--count", big, "--compile"], needs=30 if dry else 150)
    small = "16" if dry else "1024"
    check.python("embed_2048x1536", [*bench, "--count", small, "--size", "large"], needs=20 if dry else 60)
    check.python("embed_2048x1536_draft", [*bench, "--count", small, "--size", "large", "--draft"],
                 needs=20 if dry else 50)
    check.python("procs_1_vs_in_process", ["-c", PROCS, model, device, "32" if dry else "2048"],
                 needs=30 if dry else 60)
    check.python("index_cpu_faiss", [str(ROOT / "benchmarks" / "index_throughput.py"), "--count",
                                     "20000" if dry else "1000000", "--queries", "200" if dry else "2000"],
                 needs=20 if dry else 200)
    check.record("done", seconds_left=round(check.left(), 1))


def _nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                           "--format=csv,noheader"], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()


if __name__ == "__main__":
    main()
