"""Every executor runs the same per-shard unit: a local process pool and a Ray actor pool give
the in-process rows, recover from a killed worker with every row once, hand shards out
dynamically and retry them a bounded number of times; slices cover the plan exactly once and
cannot delete each other's work; the schedule is one pure decision."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from imgindex.errors import ConfigError
from imgindex.pipeline.config import RuntimeConfig
from imgindex.pipeline.handout import Event, hand_out
from imgindex.pipeline.schedule import Machine, decide

CLI = [sys.executable, "-m", "imgindex"]


def embed_cmd(sources, out, checkpoint, *extra):
    return CLI + ["embed", *map(str, sources), "--out", str(out), "--config", "test",
                  "--checkpoint", str(checkpoint), "--no-progress", *extra]


def outputs(out: Path):
    rows = pq.read_table(out / "embeddings").sort_by([("shard", "ascending"), ("key", "ascending")])
    stats = {json.loads(p.read_text())["shard"]: json.loads(p.read_text()) for p in (out / "_stats").glob("*.json")}
    return rows, stats


def assert_same_output(ours: Path, theirs: Path) -> dict:
    rows, stats = outputs(ours)
    single_rows, single_stats = outputs(theirs)
    assert rows.num_rows == len({(s, k) for s, k in zip(rows["shard"].to_pylist(), rows["key"].to_pylist())})
    assert rows.column("key").equals(single_rows.column("key")) and rows.column("shard").equals(single_rows["shard"])
    np.testing.assert_allclose(np.stack(rows["embedding"].to_numpy(zero_copy_only=False)),
                               np.stack(single_rows["embedding"].to_numpy(zero_copy_only=False)), atol=1e-5)
    keys = ("samples", "rows", "failures", "failures_by_error")
    assert {s: {k: v[k] for k in keys} for s, v in stats.items()} == {
        s: {k: v[k] for k in keys} for s, v in single_stats.items()}
    assert not [p for p in ours.rglob("*.parquet") if p.name.startswith(".")]  # no temp file a glob sees
    return stats


def worker_pids(parent: int, marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (and, if given, whose parent is `parent`)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if marker in cmdline and (not parent or ppid == parent) and "resource_tracker" not in cmdline:
            found.append(int(proc.name))
    return found


def kill_one_worker_when_busy(job: subprocess.Popen, out: Path, marker: str, parent: bool) -> int:
    """SIGKILL one worker once the first shard is done (the workers are then warm and busy)."""
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        if (out / "_stats").exists() and list((out / "_stats").glob("*.json")):
            pids = worker_pids(job.pid if parent else 0, marker)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                return pids[0]
        time.sleep(0.02)
    raise AssertionError("the job ended before a worker could be killed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, checkpoint, photos):
    """Ten shards (with a bad sample in one) and their in-process embedding, the reference."""
    from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar

    root = tmp_path_factory.mktemp("executors")
    names = sorted(photos)
    tars = []
    for s in range(10):
        members = [(f"{s:02d}{i:02d}.jpg", jpeg_bytes(photos[names[(s + i) % len(names)]].resize((160, 120))))
                   for i in range(8)]
        if s == 3:
            members.append(("broken.jpg", b"not an image"))
        tars.append(write_tar(root / f"ex-{s:05d}.tar", members))
    reference = root / "single"
    done = subprocess.run(embed_cmd(tars, reference, checkpoint), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root, tars, reference


def test_procs_pool_gives_the_in_process_output_and_survives_a_killed_process(corpus, checkpoint):
    root, tars, reference = corpus
    out = root / "procs"
    job = subprocess.Popen(embed_cmd(tars, out, checkpoint, "--procs", "2"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    kill_one_worker_when_busy(job, out, "multiprocessing.spawn", parent=True)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    assert "embedded 80 images (1 failed) from 10 shards" in stdout
    assert "exited with code -9" in stderr  # the death was seen and said
    stats = assert_same_output(out, reference)
    assert len({s["worker"] for s in stats.values()}) >= 2


def test_procs_refuse_what_cannot_hold(corpus, checkpoint, tmp_path):
    _, tars, _ = corpus
    for extra, message in ((["--procs", "2", "--slice", "0/2"], "do not mix"),
                           (["--procs", "2", "--device", "cuda:1"], "use --device cuda")):
        bad = subprocess.run(embed_cmd(tars, tmp_path / "o", checkpoint, *extra), capture_output=True, text=True,
                             timeout=300)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_ray_actor_pool_gives_the_in_process_output_and_survives_a_killed_actor(corpus, checkpoint):
    pytest.importorskip("ray")
    root, tars, reference = corpus
    out = root / "ray"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen(embed_cmd(tars, out, checkpoint, "--ray", "2"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    try:
        kill_one_worker_when_busy(job, out, "ray::EmbedActor", parent=False)
        stdout, stderr = job.communicate(timeout=300)  # the hang guard: a stuck pool fails here
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    assert "embedded 80 images (1 failed) from 10 shards" in stdout
    stats = assert_same_output(out, reference)
    assert all(s["worker"].startswith("ray-") for s in stats.values())


class FakePool:
    """Workers that take `seconds[w]` per shard (simulated), die or raise when told to."""

    def __init__(self, seconds: list[float], die: set[tuple[int, str]] = frozenset(), fail: set[str] = frozenset()):
        self.seconds, self.die, self.fail = seconds, set(die), set(fail)
        self.now, self.running, self.started = 0.0, {}, []

    def start(self, worker):
        self.started.append(worker)

    def submit(self, worker, shard):
        self.running[worker] = (self.now + self.seconds[worker], shard.name)

    def wait(self):
        worker, (at, shard) = min(self.running.items(), key=lambda item: item[1][0])
        del self.running[worker]
        self.now = at
        if (worker, shard) in self.die:
            self.die.discard((worker, shard))
            return [Event("died", worker, shard, error="killed")]
        if shard in self.fail:
            return [Event("failed", worker, shard, error="OSError: disk full")]
        return [Event("done", worker, shard, stats={"shard": shard, "worker": worker})]

    def stop(self):
        pass


def shards(count):
    from imgindex.pipeline.sources import Shard

    return [Shard(name=f"s{i:02d}", kind="tar", url=f"s{i}.tar") for i in range(count)]


def test_a_slow_worker_takes_fewer_shards():
    outcome = hand_out(FakePool([1.0, 5.0]), shards(12), workers=2, retries=2)
    taken = [s["worker"] for s in outcome.done]
    assert sorted(s["shard"] for s in outcome.done) == [f"s{i:02d}" for i in range(12)]
    assert taken.count(0) >= 4 * taken.count(1)


def test_a_died_workers_shard_goes_to_another_and_the_worker_is_replaced():
    pool = FakePool([1.0, 1.0], die={(1, "s01")})
    outcome = hand_out(pool, shards(6), workers=2, retries=2)
    assert sorted(s["shard"] for s in outcome.done) == [f"s{i:02d}" for i in range(6)]
    assert outcome.retried == 1 and outcome.restarts == 1 and pool.started == [0, 1, 1]
    assert not outcome.failed


def test_a_shard_that_fails_every_attempt_is_named_and_the_rest_finish():
    pool = FakePool([1.0, 1.0], fail={"s02"})
    outcome = hand_out(pool, shards(5), workers=2, retries=2)
    assert outcome.failed == {"s02": "OSError: disk full"} and outcome.retried == 2
    assert sorted(s["shard"] for s in outcome.done) == ["s00", "s01", "s03", "s04"]


def test_slices_cover_every_shard_exactly_once(corpus, checkpoint, tmp_path):
    _, tars, reference = corpus
    out = tmp_path / "sliced"
    for i in range(3):
        done = subprocess.run(embed_cmd(tars, out, checkpoint, "--slice", f"{i}/3"), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    assert_same_output(out, reference)


def test_slice_with_overwrite_is_refused_and_loses_nothing(corpus, checkpoint, tmp_path):
    _, tars, _ = corpus
    out = tmp_path / "sliced"
    assert subprocess.run(embed_cmd(tars, out, checkpoint, "--slice", "0/2"), capture_output=True).returncode == 0
    before = sorted(p.name for p in (out / "embeddings").glob("*.parquet"))
    refused = subprocess.run(embed_cmd(tars, out, checkpoint, "--slice", "1/2", "--overwrite"), capture_output=True,
                             text=True)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and "clear OUT once first" in lines[0]
    assert sorted(p.name for p in (out / "embeddings").glob("*.parquet")) == before and len(before) == 5


@pytest.mark.parametrize("runtime, machine, expected", [
    (RuntimeConfig(), Machine(cores=2, gpus=0),
     dict(device="cpu", precision="fp32", batch_size=16, decode="lanes", lanes=2, workers=0, ahead=0, threads=2)),
    (RuntimeConfig(), Machine(cores=16, gpus=1),
     dict(device="cuda", precision="bf16", batch_size="auto", decode="processes", lanes=1, workers=15, ahead=30,
          pin_memory=True)),
    (RuntimeConfig(workers=0), Machine(cores=8, gpus=1), dict(decode="threads", workers=0, ahead=2)),
    (RuntimeConfig(lanes=1), Machine(cores=4, gpus=0), dict(decode="threads", lanes=1, ahead=0)),
    (RuntimeConfig(compile=True), Machine(cores=4, gpus=0), dict(decode="threads", lanes=1)),
    (RuntimeConfig(), Machine(cores=64, gpus=0), dict(lanes=8, threads=64)),
    (RuntimeConfig(device="cpu", workers=3), Machine(cores=4, gpus=1), dict(device="cpu", decode="processes", workers=3)),
])
def test_the_schedule_is_a_pure_decision_from_config_and_machine(runtime, machine, expected):
    schedule = decide(runtime, machine)
    assert {k: getattr(schedule, k) for k in expected} == expected
    assert decide(runtime, machine) == schedule


def test_the_schedule_refuses_what_the_machine_cannot_do():
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        decide(RuntimeConfig(device="cuda"), Machine(cores=4, gpus=0))
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        decide(RuntimeConfig(device="cpu", precision="fp16"), Machine(cores=4, gpus=0))
