"""The prepared GPU check runs its whole logic on a CPU (--dry-run): every step writes its JSON
line, so the check cannot rot between the sessions that have a GPU. A dry run has no time budget:
how fast this machine is decides nothing here."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["machine", "versions", "correctness", "embed_eager_500x375", "embed_compile_500x375", "embed_2048x1536",
         "embed_2048x1536_draft", "procs_1_vs_in_process", "index_cpu_faiss", "done"]


def test_gpu_check_dry_run_writes_every_step(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "run", "--out", str(tmp_path),
                           "--dry-run"], capture_output=True, text=True, timeout=3600)  # a hang guard only
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == STEPS
    by_step = {line["step"]: line for line in lines}
    for step, line in by_step.items():
        if step == "embed_compile_500x375" and not (shutil.which("cc") or shutil.which("gcc")):
            continue  # torch.compile needs a C compiler on a CPU
        assert "error" not in line and "skipped" not in line, line
    assert by_step["correctness"]["gpu_vs_cpu_fp32_max_abs"] == 0.0  # both on the CPU here
    assert by_step["correctness"]["bf16_vs_fp32_cosine_min"] > 0.99
    assert by_step["embed_eager_500x375"]["e2e_images_per_s"] > 0
    assert by_step["procs_1_vs_in_process"]["procs_1_over_in_process"] > 0
