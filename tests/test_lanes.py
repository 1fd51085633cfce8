"""CPU lanes (batches decoded and embedded side by side) write what the single lane writes."""
import json
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from imgindex.errors import ConfigError
from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar
from imgindex.pipeline.job import run_embed
from imgindex.pipeline.schedule import MAX_AUTO_LANES, auto_lanes
from imgindex.pipeline.model import Backbone

from conftest import bad_and_odd_samples


@pytest.fixture
def mixed_shards(tmp_path, photos):
    """Three shards of photos with the bad and odd samples spread through them, so batches
    straddle failures and a lane's batch can come out short or empty."""
    bad = bad_and_odd_samples(photos["astronaut"])
    good = [(f"photo{i:02d}", "jpg", jpeg_bytes(photos[name].resize((120, 90))))
            for i, name in enumerate(sorted(photos) * 2)]
    samples = [(key, ext, data) for key, (ext, data, _) in bad.items()] + good
    shards = []
    for s in range(3):
        members = [(f"{key}.{ext}", data) for key, ext, data in samples[s::3]]
        shards.append(str(write_tar(tmp_path / f"mixed-{s:05d}.tar", members)))
    failing = [(f"{key}.{ext}", data) for key, (ext, data, error) in bad.items() if error]
    shards.append(str(write_tar(tmp_path / "mixed-00003.tar", failing)))  # no rows at all
    return shards


def parts(out):
    """part name -> its table, rows in stored order."""
    return {p.name: pq.read_table(p).to_pydict() for p in sorted((out / "embeddings").glob("*.parquet"))}


@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_write_the_single_lane_rows_failures_and_stats(tmp_path, mixed_shards, config_for, lanes):
    one = run_embed(mixed_shards, str(tmp_path / "one"), config_for(**{"runtime.lanes": 1, "runtime.batch_size": 4}),
                    progress=False)
    many = run_embed(mixed_shards, str(tmp_path / "lanes"),
                     config_for(**{"runtime.lanes": lanes, "runtime.batch_size": 4}), progress=False)
    assert (many.images, many.failed, many.failures_by_error) == (one.images, one.failed, one.failures_by_error)
    assert many.failed > 0 and many.images > 20

    single, side_by_side = parts(tmp_path / "one"), parts(tmp_path / "lanes")
    assert single.keys() == side_by_side.keys() and len(single) == 3  # no part for the shard without rows
    for name, table in single.items():
        assert side_by_side[name]["key"] == table["key"]  # the same rows in the same (sample) order
        for column in ("width", "height", "sha256", "phash", "bytes"):
            assert side_by_side[name][column] == table[column]
        np.testing.assert_allclose(np.asarray(side_by_side[name]["embedding"]), np.asarray(table["embedding"]),
                                   atol=1e-5)
    failure_parts = sorted(p.name for p in (tmp_path / "one" / "failures").glob("*.parquet"))
    assert len(failure_parts) == 4
    for name in failure_parts:
        assert (pq.read_table(tmp_path / "lanes" / "failures" / name).to_pydict()
                == pq.read_table(tmp_path / "one" / "failures" / name).to_pydict())
    assert len(list((tmp_path / "lanes" / "_stats").glob("*.json"))) == 4
    for stats in sorted((tmp_path / "one" / "_stats").glob("*.json")):
        theirs = json.loads((tmp_path / "lanes" / "_stats" / stats.name).read_text())
        ours = json.loads(stats.read_text())
        assert {k: theirs[k] for k in ("samples", "rows", "failures", "failures_by_error")} == {
            k: ours[k] for k in ("samples", "rows", "failures", "failures_by_error")}


def test_auto_lanes_are_resolved_recorded_and_leave_the_threads_as_they_were(tmp_path, photo_tars, config_for):
    threads = torch.get_num_threads()
    run_embed([str(t) for t in photo_tars(count=2, per_shard=3)], str(tmp_path / "out"), config_for(), progress=False)
    runtime = json.loads((tmp_path / "out" / "_manifest.json").read_text())["schedule"]
    assert runtime["workers"] == 0 and runtime["lanes"] == auto_lanes(threads)
    assert torch.get_num_threads() == threads
    assert not [t for t in threading.enumerate() if t.name.startswith("lane-")]


def test_auto_lanes_are_one_per_thread_up_to_the_cap_then_wider():
    assert [auto_lanes(n) for n in (1, 2, 3, 8)] == [1, 2, 3, 8]
    assert auto_lanes(12) == 6 and auto_lanes(64) == MAX_AUTO_LANES == 8  # 2 and 8 threads a lane


def test_an_error_in_a_lane_stops_the_job_and_leaves_no_lane_running(tmp_path, photo_tars, config_for, monkeypatch):
    calls = []
    real = Backbone.embed

    def failing(self, images):
        calls.append(len(images))
        if len(calls) == 3:
            raise RuntimeError("forward failed")
        return real(self, images)

    monkeypatch.setattr(Backbone, "embed", failing)
    tars = [str(t) for t in photo_tars(count=4, per_shard=4)]
    with pytest.raises(RuntimeError, match="forward failed"):
        run_embed(tars, str(tmp_path / "out"), config_for(**{"runtime.lanes": 2, "runtime.batch_size": 2}),
                  progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("lane-")]
    # What was written is whole: each stats marker has its full part.
    for stats in (tmp_path / "out" / "_stats").glob("*.json"):
        part = tmp_path / "out" / "embeddings" / stats.name.replace(".json", ".parquet")
        assert pq.read_table(part).num_rows == json.loads(stats.read_text())["rows"] == 4


@pytest.mark.parametrize("overrides, message", [
    ({"runtime.workers": 1}, "needs a CPU device and --workers 0.*use --lanes 1 with cpu and 1 workers"),
    ({"runtime.device": "cuda:0"}, "needs a CPU device and --workers 0.*use --lanes 1 with cuda:0 and 0 workers"),
    ({"runtime.compile": True}, "does not mix with --compile.*use --lanes 1"),
    ({"runtime.compile": True, "runtime.workers": "auto"}, "does not mix with --compile.*use --lanes 1"),
])
def test_lanes_with_decode_workers_a_gpu_or_compile_are_refused_when_the_config_loads(config_for, overrides, message):
    with pytest.raises(ConfigError, match="--lanes 2 " + message):
        config_for(**{"runtime.lanes": 2, **overrides})
    assert config_for(**{"runtime.lanes": 1, **overrides}).runtime.lanes == 1
