"""The paper cuts a new user hits on the command line: numeric flags, -v, --help, Ctrl-C hints,
search.py outside its environment, a missing faiss, an offline hub, the progress bar, and
the per-shard timings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgindex.cli import main
from imgindex.pipeline.demo_corpus import jpeg_bytes

ROOT = Path(__file__).resolve().parent.parent


def run(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def one_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("args, flag", [
    (["search", "--key", "k", "-k", "0"], "-k"),
    (["search", "--key", "k", "-k", "-1"], "-k"),
    (["search", "--key", "k", "--nprobe", "0"], "--nprobe"),
    (["dedup", "--index", "i", "--max-neighbors", "-5"], "--max-neighbors"),
    (["dedup", "--index", "i", "--max-neighbors", "0"], "--max-neighbors"),
    (["dedup", "--index", "i", "--calibrate", "--sample", "0"], "--sample"),
    (["dedup", "--index", "i", "--threshold", "1.5"], "--threshold"),
    (["dedup", "--index", "i", "--phash-distance", "17"], "--phash-distance"),
    (["index", "e", "--out", "o", "--target-recall", "0"], "--target-recall"),
    (["embed", "s", "--out", "o", "--procs", "0"], "--procs"),
    (["embed", "s", "--out", "o", "--ray", "-1"], "--ray"),
])
def test_every_numeric_flag_is_checked_in_one_line(args, flag):
    line = one_line(run("-m", "imgindex", *args))
    assert f"argument {flag}" in line and "must be" in line


def test_search_py_takes_the_same_checks():
    line = one_line(run(ROOT / "search.py", "--key", "k", "-k", "0"))
    assert "argument -k: must be a whole number from 1" in line


def test_verbose_flag_after_the_command(capsys):
    assert main(["search", "-v", "--index", "/nonexistent/idx", "--key", "k"]) == 2
    assert "no index at /nonexistent/idx" in capsys.readouterr().err


def test_demo_help_names_the_demo_model():
    text = run("-m", "imgindex", "demo", "--help").stdout
    assert "tf_efficientnet_lite0" in " ".join(text.split()) and "xcit_large" not in text


@pytest.mark.parametrize("command, hint", [
    ("index", "rerun the same command to resume from the finished sub-indexes"),
    ("dedup", "dedup did not finish and wrote nothing new; rerun the same command"),
    ("embed", "rerun the same command to finish the remaining shards"),
])
def test_ctrl_c_says_what_to_do_for_each_command(monkeypatch, capsys, command, hint):
    import importlib

    import imgindex.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    argv = {"index": ["index", "e", "--out", "o"], "dedup": ["dedup", "--index", "i"],
            "embed": ["embed", "s", "--out", "o"]}[command]
    monkeypatch.setattr(importlib.import_module(f"imgindex.cli.{command}"), f"cmd_{command}", interrupted)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == f"imgindex: interrupted; {hint}"


def test_search_py_outside_its_environment_says_so_in_one_line():
    result = subprocess.run([sys.executable, "-S", str(ROOT / "search.py"), "--image", "q.png"],
                            capture_output=True, text=True, cwd=ROOT)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "run it with the Python that has imgindex installed" in lines[0] and ".venv/bin/python" in lines[0]


def test_a_missing_faiss_is_an_install_hint():
    code = ("import sys; sys.modules['faiss'] = None; from imgindex.cli import main; "
            "sys.exit(main(['index', 'emb', '--out', 'idx']))")
    line = one_line(run("-c", code))
    assert "faiss is not installed: pip install -c constraints.txt '.[cpu]'" in line


def test_offline_hub_fails_at_once_with_one_line(tmp_path, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes(photos["coffee"].resize((64, 48))))
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    line = one_line(run("-m", "imgindex", "embed", folder, "--out", tmp_path / "out", "--config", "cpu", env=env))
    assert "cannot be reached" in line and "--checkpoint FILE" in line
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_progress_bar_counts_images_of_folders(tmp_path, photos, config_for, capsys):
    from imgindex.pipeline.job import run_embed

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(sorted(photos)[:6]):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(photos[name].resize((64, 48))))
    run_embed([str(folder)], str(tmp_path / "out"), config_for(), progress=True)  # shards of 4: two shards
    assert "6/6" in capsys.readouterr().err


def test_shard_seconds_run_from_the_first_read(tmp_path, photos, config_for, monkeypatch):
    """A shard whose reading takes 0.5 s before its first sample records at least that long."""
    import imgindex.pipeline.job as embed_module
    from imgindex.pipeline import sources

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(sorted(photos)[:2]):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(photos[name].resize((64, 48))))
    slow_read = sources.read_files

    def read_files(shard, timeout=None, max_bytes=None):
        time.sleep(0.5)  # a slow mount
        yield from slow_read(shard, timeout, max_bytes)

    for module in ("imgindex.pipeline.sources", "imgindex.pipeline.shard_job"):
        monkeypatch.setattr(f"{module}.read_shard", lambda shard, timeout=None, max_bytes=None: read_files(shard, timeout, max_bytes),
                            raising=False)
    embed_module.run_embed([str(folder)], str(tmp_path / "out"), config_for(), progress=False)
    (stats,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_stats").glob("*.json")]
    assert stats["rows"] == 2 and stats["seconds"] >= 0.5
    assert stats["images_per_s"] == pytest.approx(2 / stats["seconds"], rel=0.01)


def test_a_corrupt_index_message_is_readable(tmp_path):
    from imgindex.indexes.build import build_index
    from synthetic import clustered_vectors, write_embeddings_dir

    write_embeddings_dir(str(tmp_path / "emb"), clustered_vectors(300, 16, clusters=10), shard_size=300)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    path = tmp_path / "idx" / "index.faiss"
    path.write_bytes(path.read_bytes()[:40])
    line = one_line(run("-m", "imgindex", "search", "--index", tmp_path / "idx", "--key", "syn1"))
    assert "is corrupt or truncated" in line and "faiss::" not in line and "/project" not in line
    assert "rebuild the index" in line


def test_building_the_parser_reads_no_config(monkeypatch):
    """The --model help names the config's model, but only help reads it: not every command."""
    import imgindex.cli.args as args
    from imgindex.cli import build_parser

    def read(*_, **__):
        raise AssertionError("a config was read to build the parser")

    monkeypatch.setattr(args, "load_config", read)
    parser = build_parser()
    assert parser.parse_args(["embed", "x", "--out", "o"]).command == "embed"
