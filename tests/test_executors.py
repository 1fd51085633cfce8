"""Every executor runs the same per-shard unit: a local process pool and a Ray actor pool give
the in-process rows, recover from a killed worker with every row once, hand shards out
dynamically and retry them a bounded number of times; slices cover the plan exactly once and
cannot delete each other's work; the schedule is one pure decision. A Ray pool finishes on a
cluster with fewer CPUs than actors asked for, and after a node dies; Ctrl-C ends any executor
as it ends a local run; a killed driver leaves no worker behind. Tests signal only processes
they started: the Ray tests run on a cluster of their own (a head and a second node, 1 CPU each)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from imgindex.errors import ConfigError
from imgindex.pipeline.config import RuntimeConfig
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


def stats_files(out: Path) -> list[Path]:
    return sorted((out / "_stats").glob("*.json")) if (out / "_stats").exists() else []


def wait_for_shards(job: subprocess.Popen, out: Path, count: int = 1, seconds: float = 240) -> None:
    """Until `count` shards are done (the workers are then warm and busy); the bound turns a hang
    into a failure."""
    deadline = time.time() + seconds
    while len(stats_files(out)) < count:
        if job.poll() is not None:
            raise AssertionError(f"the job ended (code {job.returncode}) before {count} shards were done")
        if time.time() > deadline:
            raise AssertionError(f"fewer than {count} shards done after {seconds} s")
        time.sleep(0.02)


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a live process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every live process below `pid` (its children, theirs, ...)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))):
            parents[int(entry.name)] = stat
    found, frontier = {}, [pid]
    while frontier:
        below = [p for p, (_, ppid, _) in parents.items() if ppid in frontier and p not in found]
        found.update({p: parents[p][2] for p in below})
        frontier = below
    return found


def still_running(pid: int, started: int) -> bool:
    """The same process (not a reused pid) and not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat[2] == started and stat[0] != "Z"


def kill_one_worker_when_busy(job: subprocess.Popen, out: Path, marker: str) -> int:
    """SIGKILL one of this job's own workers once shards are done (the workers are then warm and
    busy). Its pid comes from the job itself: a finished shard's stats name the worker that made
    it, `<kind>-<slot>-<pid>`; it is killed only if it still runs the job's worker (`marker`)."""
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        for path in stats_files(out):
            pid = int(json.loads(path.read_text())["worker"].rsplit("-", 1)[1])
            if marker in cmdline(pid):
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.02)
    raise AssertionError("the job ended before a worker could be killed")


def end_job(job: subprocess.Popen) -> None:
    """A test's own job, still running after a failure: its whole session goes (it was started in one)."""
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()


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


@pytest.fixture(scope="module")
def many_tars(corpus) -> list[Path]:
    """Thirty shards (the corpus' ten, three times under other names): work enough that a job is
    still running when a test interrupts it or kills its driver."""
    root, tars, _ = corpus
    many = root / "many"
    many.mkdir(exist_ok=True)
    return [Path(shutil.copy(tar, many / f"{copy}-{tar.name}")) for copy in "abc" for tar in tars]


class StuckJob:
    """The corpus' shards and, sorted last, a tar that is a FIFO no writer opens, read with a
    600 s deadline: a job on it is always mid-work when a test interrupts or kills it, however
    fast or loaded the machine. `unstick()` puts a real tar in its place, for the rerun."""

    def __init__(self, corpus, where: Path):
        root, tars, _ = corpus
        where.mkdir(parents=True, exist_ok=True)
        self.stuck = where / "zz-stuck-00000.tar"
        os.mkfifo(self.stuck)
        self.config = where / "slow-reads.yaml"
        self.config.write_text("base: test\nsource:\n  read_timeout_s: 600\n")
        self.sources, self.spare = [*tars, self.stuck], tars[0]

    def command(self, out: Path, checkpoint: Path, *extra) -> list[str]:
        command = embed_cmd(self.sources, out, checkpoint, *extra)
        command[command.index("--config") + 1] = str(self.config)
        return command

    def unstick(self) -> None:
        self.stuck.unlink()
        shutil.copy(self.spare, self.stuck)


class RayCluster:
    """A local Ray cluster that the tests started: a head and a second node, 1 CPU each. Jobs
    reach it through `env` (RAY_ADDRESS); `kill_node` kills the second node's processes."""

    def __init__(self, cluster, temp: str):
        self.cluster, self.temp = cluster, temp
        self.node = cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        self.env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_TMPDIR": temp, **LOOPBACK_ONLY}

    def kill_node(self) -> None:
        self.cluster.remove_node(self.node, allow_graceful=False)
        self.node = None

    def add_node(self) -> None:
        if self.node is None:
            self.node = self.cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)


LOOPBACK = "127.0.0.1"  # the test cluster talks to this machine's loopback only
# Ray's switch for single-machine use: every process (nodes, drivers, actors) takes the loopback
# address as its node address instead of the machine's network interface.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def ray_cluster():
    """One Ray cluster for this module's Ray tests: each job joins it instead of starting a local
    Ray, and nothing joins a Ray of another job on this machine (RAY_TMPDIR keeps the address
    file, which a plain ray.init() reads, in the tests' own folder)."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    saved = {name: os.environ.get(name) for name in ("RAY_TMPDIR", *LOOPBACK_ONLY)}
    os.environ.update({"RAY_TMPDIR": temp, **LOOPBACK_ONLY})
    try:
        cluster = cluster_utils.Cluster(initialize_head=True,
                                        head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                        "node_ip_address": LOOPBACK})
        try:
            yield RayCluster(cluster, temp)
        finally:
            cluster.shutdown()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(temp, ignore_errors=True)


def test_procs_pool_gives_the_in_process_output_and_survives_a_killed_process(corpus, checkpoint):
    root, tars, reference = corpus
    out = root / "procs"
    job = subprocess.Popen(embed_cmd(tars, out, checkpoint, "--procs", "2"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        killed = kill_one_worker_when_busy(job, out, "multiprocessing.spawn")
        stdout, stderr = job.communicate(timeout=300)
    finally:
        end_job(job)
    assert killed != job.pid
    assert job.returncode == 0, stderr
    assert "embedded 80 images (1 failed) from 10 shards" in stdout
    assert "exited with code -9" in stderr  # the death was seen and said
    stats = assert_same_output(out, reference)
    assert len({s["worker"] for s in stats.values()}) >= 2


def test_procs_refuse_what_cannot_hold(corpus, checkpoint, tmp_path):
    _, tars, _ = corpus
    for extra, message in ((["--procs", "2", "--ray", "2"], "do not mix"),
                           (["--procs", "2", "--device", "cuda:1"], "use --device cuda")):
        bad = subprocess.run(embed_cmd(tars, tmp_path / "o", checkpoint, *extra), capture_output=True, text=True,
                             timeout=300)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_ray_actor_pool_gives_the_in_process_output_and_survives_a_killed_actor(corpus, checkpoint, ray_cluster):
    root, tars, reference = corpus
    out = root / "ray"
    # A process that looks like a Ray actor of another job on this machine: it must survive.
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "ray::EmbedActor"])
    job = subprocess.Popen(embed_cmd(tars, out, checkpoint, "--ray", "2"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ray_cluster.env, start_new_session=True)
    try:
        killed = kill_one_worker_when_busy(job, out, "ray::EmbedActor")
        stdout, stderr = job.communicate(timeout=300)  # the hang guard: a stuck pool fails here
    finally:
        end_job(job)
        decoy_alive = decoy.poll() is None
        decoy.kill()
        decoy.wait()
    assert decoy_alive and killed != decoy.pid
    assert job.returncode == 0, stderr[-3000:]
    assert "imgindex: warning: Ray actor" in stderr  # the actor's death was seen and said
    assert "embedded 80 images (1 failed) from 10 shards" in stdout
    stats = assert_same_output(out, reference)
    assert all(s["worker"].startswith("ray-") for s in stats.values())


def test_ray_auto_starts_one_actor_per_node_of_the_cluster(corpus, checkpoint, ray_cluster, tmp_path):
    _, tars, reference = corpus
    out = tmp_path / "auto"
    done = subprocess.run(embed_cmd(tars, out, checkpoint, "--ray", "auto"), capture_output=True, text=True,
                          env=ray_cluster.env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = assert_same_output(out, reference)
    assert {s["worker"].split("-")[1] for s in stats.values()} == {"0", "1"}  # 2 nodes x 1 CPU: two actors


def test_ray_asked_for_more_actors_than_the_cluster_holds_says_so_and_finishes(corpus, checkpoint, ray_cluster,
                                                                              tmp_path):
    _, tars, reference = corpus
    out = tmp_path / "capped"
    job = subprocess.Popen(embed_cmd(tars, out, checkpoint, "--ray", "3"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ray_cluster.env, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=300)  # before: 9 of 10 shards, then a wait without end
    finally:
        end_job(job)
    assert job.returncode == 0, stderr[-3000:]
    capped = [line for line in stderr.splitlines() if line.startswith("imgindex: --ray 3")]
    assert len(capped) == 1 and "hold 2 actors of 1 CPU each; starting 2" in capped[0], stderr[-3000:]
    assert "embedded 80 images (1 failed) from 10 shards" in stdout
    assert_same_output(out, reference)


def test_ray_pool_finishes_when_a_node_dies_and_its_replacement_cannot_be_placed(many_tars, checkpoint,
                                                                                  ray_cluster, tmp_path):
    """The second node dies with its actor's shard: the replacement actor finds no free CPU (the
    survivor holds the only one) and stays pending; the shard goes to the survivor instead."""
    out = tmp_path / "node-died"
    job = subprocess.Popen(embed_cmd(many_tars, out, checkpoint, "--ray", "2"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ray_cluster.env, start_new_session=True)
    try:
        wait_for_shards(job, out)
        ray_cluster.kill_node()
        stdout, stderr = job.communicate(timeout=300)  # before: the last shard waited on the replacement forever
    finally:
        end_job(job)
        ray_cluster.add_node()
    assert job.returncode == 0, stderr[-3000:]
    assert "imgindex: warning: Ray actor" in stderr
    assert f"from {len(many_tars)} shards" in stdout and len(stats_files(out)) == len(many_tars)


def test_ray_pool_that_cannot_place_any_actor_stops_with_a_clear_error(ray_cluster, config_for, tmp_path):
    ray = pytest.importorskip("ray")
    from imgindex.executors.handout import NoWorkers, hand_out
    from imgindex.executors.ray_actors import RayPool
    from imgindex.pipeline.job import EmbedWorkers
    from imgindex.pipeline.sources import Shard

    config = config_for()
    schedule = decide(config.runtime, Machine(cores=2, gpus=0))
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init sets its own in this process
    ray.init(address=ray_cluster.cluster.address, include_dashboard=False)
    try:
        factory = EmbedWorkers(str(tmp_path / "out"), config, schedule)
        pool = RayPool(ray, factory, "Embed", cpus=2, placement_timeout=5)  # no node has 2
        shards = [Shard(name=f"s{i}", kind="tar", url=str(tmp_path / f"s{i}.tar")) for i in range(3)]
        with pytest.raises(NoWorkers, match="workers 0, 1: not placed by Ray within 5 s: no node has 2 CPU free"):
            hand_out(pool, shards, workers=2, retries=2)
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, sigterm)


INTERRUPTED = "imgindex: interrupted; rerun the same command to finish the remaining shards"


@pytest.mark.parametrize("executor, stop", [([], "ctrl-c"), (["--procs", "2"], "ctrl-c"), (["--ray", "2"], "ctrl-c"),
                                            (["--ray", "2"], "sigterm")],
                         ids=["local", "procs", "ray", "ray-sigterm"])
def test_ctrl_c_ends_any_executor_as_it_ends_a_local_run_and_the_rerun_finishes(executor, stop, corpus, checkpoint,
                                                                               request, tmp_path):
    """Ctrl-C in a terminal signals the job's whole process group (the job runs in a session of its own);
    `kill PID` or a scheduler's stop sends SIGTERM to the driver alone, which ends the same way (with
    Ray it aborted, exit 134)."""
    out = tmp_path / "interrupted"
    stuck = StuckJob(corpus, tmp_path / "in")
    command = stuck.command(out, checkpoint, *executor)
    env = request.getfixturevalue("ray_cluster").env if "--ray" in executor else None
    # as a terminal starts a job: a shell that runs the tests in the background makes its children
    # ignore SIGINT (inherited across exec), so the job's SIGINT is put back to its default
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_shards(job, out)
        if stop == "ctrl-c":
            os.killpg(job.pid, signal.SIGINT)
        else:
            os.kill(job.pid, signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        end_job(job)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert job.returncode == 130 and lines[-1] == INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(stats_files(out)) < len(stuck.sources)
    stuck.unstick()
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already done" in rerun.stdout and len(stats_files(out)) == len(stuck.sources)


def test_killing_the_procs_driver_ends_its_workers(corpus, checkpoint, tmp_path):
    out = tmp_path / "orphans"
    stuck = StuckJob(corpus, tmp_path / "in")
    job = subprocess.Popen(stuck.command(out, checkpoint, "--procs", "2"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    below: dict[int, int] = {}
    left: dict[int, str] = {}
    try:
        wait_for_shards(job, out)
        below = descendants(job.pid)
        assert sum("multiprocessing.spawn" in cmdline(pid) for pid in below) >= 2, below
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
        deadline = time.time() + 120
        while time.time() < deadline:
            left = {pid: cmdline(pid) for pid, started in below.items() if still_running(pid, started)}
            if not left:
                break
            time.sleep(0.2)
    finally:
        end_job(job)
        for pid, started in below.items():  # what the test's own job left behind
            if still_running(pid, started):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after their driver was killed: {left}"


def test_slices_cover_every_shard_exactly_once_with_any_executor(corpus, checkpoint, tmp_path):
    """--slice is a filter on the plan: the middle slice runs on a --procs pool, the others in-process."""
    _, tars, reference = corpus
    out = tmp_path / "sliced"
    for i in range(3):
        executor = ["--procs", "2"] if i == 1 else []
        done = subprocess.run(embed_cmd(tars, out, checkpoint, "--slice", f"{i}/3", *executor), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"from {len(tars[i::3])} shards" in done.stdout
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


def test_dedup_on_ray_actors_gives_the_in_process_pairs(ray_cluster, tmp_path):
    """The partitioned embedding tier's tasks on two Ray actors: the pairs and groups of one process."""
    from imgindex.formats.embeddings_dir import normalize_rows
    from imgindex.indexes.build import BuildOptions, build_index
    from synthetic import clustered_vectors, write_embeddings_dir

    rng = np.random.default_rng(0)
    base = clustered_vectors(4000, 32, clusters=40, spread=1.0, seed=0)
    copies = normalize_rows(base[:300] + rng.standard_normal((300, 32)).astype(np.float32) * 0.03)
    write_embeddings_dir(str(tmp_path / "emb"), np.vstack([base, copies]), shard_size=1500)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), BuildOptions(flat_threshold=1000, eval_queries=100),
                progress=False)
    dedup = CLI + ["dedup", "--index", str(tmp_path / "idx"), "--method", "embedding", "--threshold", "0.95",
                   "--no-progress"]
    single = subprocess.run(dedup + ["--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    pooled = subprocess.run(dedup + ["--out", str(tmp_path / "ray"), "--ray", "2"], capture_output=True, text=True,
                            env=ray_cluster.env, timeout=300)
    assert pooled.returncode == 0, pooled.stderr[-3000:]
    for table in ("pairs.parquet", "groups.parquet"):
        ours, theirs = pq.read_table(tmp_path / "ray" / table), pq.read_table(tmp_path / "one" / table)
        assert ours.num_rows >= 300 and ours.equals(theirs)
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["partitions"]["workers"] == 2
    assert not (tmp_path / "ray" / "imgindex-dedup-work").exists()
    # the leakage check (--against) on the same tasks: near copies of 200 indexed rows and 100 others
    other = normalize_rows(np.vstack([base[1000:1200] + rng.standard_normal((200, 32)).astype(np.float32) * 0.03,
                                      clustered_vectors(100, 32, clusters=10, spread=1.0, seed=9)]))
    write_embeddings_dir(str(tmp_path / "test"), other, shard_size=150, prefix="test")
    leaks = dedup + ["--against", str(tmp_path / "test")]
    single = subprocess.run(leaks + ["--out", str(tmp_path / "leak-one")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    pooled = subprocess.run(leaks + ["--out", str(tmp_path / "leak-ray"), "--ray", "2"], capture_output=True,
                            text=True, env=ray_cluster.env, timeout=300)
    assert pooled.returncode == 0, pooled.stderr[-3000:]
    ours, theirs = pq.read_table(tmp_path / "leak-ray" / "pairs.parquet"), pq.read_table(tmp_path / "leak-one" /
                                                                                       "pairs.parquet")
    assert ours.num_rows >= 200 and ours.equals(theirs)
    assert not (tmp_path / "leak-ray" / "imgindex-leaks-work").exists()
