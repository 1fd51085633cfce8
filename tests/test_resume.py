"""A killed job resumes where it stopped; nothing is duplicated or half-written."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch

from imgindex.pipeline.job import run_embed

from conftest import MODEL

CLI = [sys.executable, "-m", "imgindex"]


def embed_cmd(sources, out, checkpoint, *extra):
    return CLI + ["embed", *map(str, sources), "--out", str(out), "--config", "test",
                  "--checkpoint", str(checkpoint), "--no-progress", *extra]


def table_by_key(out):
    table = pq.read_table(out / "embeddings").to_pydict()
    return {(s, k): e for s, k, e in zip(table["shard"], table["key"], table["embedding"])}


def test_rerun_after_kill_finishes_only_the_missing_shards(tmp_path, photo_tars, checkpoint, config_for):
    tars = photo_tars(count=24, per_shard=4)
    out = tmp_path / "out"
    job = subprocess.Popen(embed_cmd(tars, out, checkpoint), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        done = list((out / "_stats").glob("part-*.json")) if (out / "_stats").exists() else []
        if len(done) >= 3:
            job.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    done_before = {p.name for p in (out / "_stats").glob("part-*.json")}
    assert 3 <= len(done_before) < len(tars)
    # Only whole parts are visible to readers, and each done shard has its part.
    for part in (out / "embeddings").glob("*.parquet"):
        assert pq.read_table(part).num_rows == 4
    assert {p.name.replace(".json", ".parquet") for p in (out / "_stats").glob("*.json")} <= {
        p.name for p in (out / "embeddings").glob("*.parquet")}

    rerun = subprocess.run(embed_cmd(tars, out, checkpoint), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_before)} shards already done" in rerun.stdout
    assert f"from {len(tars) - len(done_before)} shards" in rerun.stdout

    resumed = table_by_key(out)
    assert len(resumed) == len(tars) * 4 == pq.read_table(out / "embeddings").num_rows
    clean = tmp_path / "clean"
    run_embed([str(t) for t in tars], str(clean), config_for(), progress=False)
    reference = table_by_key(clean)
    assert resumed.keys() == reference.keys()
    for key, vector in reference.items():
        np.testing.assert_allclose(resumed[key], vector, atol=1e-6)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, photo_tars, checkpoint):
    """The job cannot finish before the interrupt: its last shard is a FIFO no writer opens, and
    its read deadline (600 s) is far beyond the test's wait, so the job is always mid-work."""
    import os

    tars = [*photo_tars(count=2, per_shard=4)]
    os.mkfifo(tmp_path / "zz-00000.tar")  # sorted last: the job blocks here after the photo shards
    config = tmp_path / "slow-reads.yaml"
    config.write_text("base: test\nsource:\n  read_timeout_s: 600\n")
    out = tmp_path / "out"
    command = embed_cmd([*tars, tmp_path / "zz-00000.tar"], out, checkpoint)
    command[command.index("--config") + 1] = str(config)
    # A shell that starts the tests in the background makes its children ignore SIGINT, and
    # Python then installs no Ctrl-C handler: give the job the default disposition, as in a terminal.
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(out.glob("_stats/part-*.json"))) < len(tars):
            assert job.poll() is None, job.communicate()[1]
            time.sleep(0.05)
        assert len(list(out.glob("_stats/part-*.json"))) == len(tars), "the photo shards were not done in time"
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("imgindex: interrupted; rerun the same command to finish the remaining "
                                            "shards") and "Traceback" not in err


def test_a_finished_job_reruns_as_a_no_op(tmp_path, photo_tars, config_for):
    tars = [str(t) for t in photo_tars(count=2, per_shard=2)]
    run_embed(tars, str(tmp_path / "out"), config_for(), progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    summary = run_embed(tars, str(tmp_path / "out"), config_for(), progress=False)
    assert summary.shards_skipped == 2 and summary.images == 0
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}


def test_other_weights_into_the_same_dir_are_refused_unless_overwrite(tmp_path, photo_tars, checkpoint):
    from safetensors.torch import save_file

    tars = photo_tars(count=2, per_shard=2)
    out = tmp_path / "out"
    assert subprocess.run(embed_cmd(tars, out, checkpoint), capture_output=True).returncode == 0
    torch.manual_seed(99)
    other = tmp_path / "other.safetensors"
    save_file(timm.create_model(MODEL, pretrained=False).state_dict(), str(other))

    refused = subprocess.run(embed_cmd(tars, out, other), capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("imgindex: error:") and "weights" in refused.stderr
    assert "--overwrite" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    normalize_changed = subprocess.run(
        embed_cmd(tars, out, checkpoint) + ["--precision", "bf16"], capture_output=True, text=True)
    assert normalize_changed.returncode == 2 and "precision" in normalize_changed.stderr

    redone = subprocess.run(embed_cmd(tars, out, other, "--overwrite"), capture_output=True, text=True)
    assert redone.returncode == 0, redone.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["weights"]["path"] == str(other)
    assert pq.read_table(out / "embeddings").num_rows == 4


def test_stale_temporary_files_are_invisible_and_replaced(tmp_path, photo_tars, config_for):
    tars = [str(t) for t in photo_tars(count=1, per_shard=2)]
    out = tmp_path / "out"
    (out / "embeddings").mkdir(parents=True)
    stale = out / "embeddings" / ".part-shard-00000.parquet.tmp"
    stale.write_bytes(b"half a part from a crashed run")
    run_embed(tars, str(out), config_for(), progress=False)
    assert not stale.exists()
    assert [p.name for p in (out / "embeddings").iterdir()] == ["part-shard-00000.parquet"]


def test_a_finished_job_rerun_loads_no_model(tmp_path, photo_tars, config_for, monkeypatch):
    import imgindex.pipeline.shard_job as shard_job
    from imgindex.errors import ConfigError

    tars = photo_tars(count=2, per_shard=2)
    first = run_embed([str(t) for t in tars], str(tmp_path / "out"), config_for(), progress=False)
    assert first.shards_done == 2

    def no_model(*args, **kwargs):
        raise AssertionError("a rerun with nothing to do loaded the model")

    monkeypatch.setattr(shard_job, "load_backbone", no_model)
    again = run_embed([str(t) for t in tars], str(tmp_path / "out"), config_for(), progress=False)
    assert again.shards_done == 0 and again.shards_skipped == 2 and "2 shards already done" in again.line()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="made differently"):  # other settings: refused, not skipped
        run_embed([str(t) for t in tars], str(tmp_path / "out"), config_for(**{"runtime.precision": "bf16"}),
                  progress=False)
