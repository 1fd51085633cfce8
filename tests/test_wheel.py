"""The package as users get it: a built wheel installed into a fresh venv, run from another
directory. It claims only the `imgindex` namespace, ships its named configs, and embeds,
indexes and searches a small tar with the test config and a checkpoint file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (found,) = dist.glob("imgindex-*.whl")
    return found


def test_wheel_claims_only_the_imgindex_namespace_and_ships_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"imgindex", next(t for t in top if t.endswith(".dist-info"))}
    for config in ("default", "cpu", "test"):
        assert f"imgindex/configs/{config}.yaml" in names
    assert "imgindex/pipeline/job.py" in names and "imgindex/indexes/query.py" in names


def test_gpu_extra_does_not_install_faiss_cpu_beside_faiss_gpu(wheel):
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    gpu = [r for r in requires if 'extra == "gpu"' in r]
    assert not any(r.startswith("faiss") for r in base), base
    assert [r.split(";")[0].strip() for r in gpu] == ["faiss-gpu>=1.15"]
    assert any(r.startswith("braceexpand") for r in base)


def test_installed_wheel_runs_from_any_directory(wheel, tmp_path, checkpoint, photos):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt"),
                              f"{wheel}[cpu]"], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names = sorted(photos)[:3]
    tar = write_tar(elsewhere / "photos.tar", [(f"{n}.jpg", jpeg_bytes(photos[n].resize((64, 48)))) for n in names])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(a) for a in args], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    imgindex = venv / "bin" / "imgindex"
    assert "embed" in run(imgindex, "--help").stdout
    assert "embed" in run(python, "-m", "imgindex", "--help").stdout
    run(imgindex, "embed", tar, "--out", "emb", "--config", "test", "--checkpoint", checkpoint, "--no-progress")
    run(imgindex, "index", "emb", "--out", "idx", "--no-progress")
    found = run(imgindex, "search", "--index", "idx", "--key", names[0], "-k", "3", "--json")
    hits = json.loads(found.stdout.splitlines()[0])["hits"]
    assert len(hits) == 3 and names[0] in {h["key"] for h in hits}
    location = run(python, "-c", "import imgindex.pipeline, sys; print(imgindex.pipeline.__file__)").stdout
    assert str(venv) in location  # the installed copy, not the repository's
    # From the repository's root its own imgindex/ comes first on sys.path: it must be the whole package.
    for args in ([python, "-m", "imgindex", "search", "--help"], [python, "search.py", "--help"]):
        at_root = subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert at_root.returncode == 0 and "--image" in at_root.stdout, at_root.stderr[-2000:]
