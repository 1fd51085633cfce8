"""Weights loading and the forward path: checkpoints in either format, precision, devices."""
import json
import shutil

import numpy as np
import pytest
import torch

from imgindex.pipeline.config import load_config
from imgindex.pipeline.decode import build_preprocess, stack_nchw
from imgindex.pipeline.model import load_backbone


def uint8_batch(photos, backbone, names=("coffee", "chelsea", "rocket")):
    preprocess = build_preprocess(backbone.data_config)
    return stack_nchw([preprocess(photos[n]) for n in names])


def test_pth_with_state_dict_wrapper_loads_the_same_weights_as_safetensors(tmp_path, checkpoint, config_for):
    from safetensors.torch import load_file

    pth = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in load_file(str(checkpoint)).items()}, "epoch": 3}, pth)
    from_safetensors = load_backbone(config_for())
    from_pth = load_backbone(config_for(**{"model.checkpoint": str(pth)}))
    assert from_pth.weights["sha256"] == from_safetensors.weights["sha256"]
    assert from_pth.weights["source"] == "checkpoint"


def test_random_weights_are_explicit_seeded_and_recorded():
    first = load_backbone(load_config("test"))
    second = load_backbone(load_config("test"))
    other_seed = load_backbone(load_config("test", {"seed": 5}))
    assert first.weights["source"] == "random"
    assert first.weights["sha256"] == second.weights["sha256"] != other_seed.weights["sha256"]


def test_bf16_autocast_path_returns_float32_unit_vectors(photos, config_for):
    fp32 = load_backbone(config_for())
    bf16 = load_backbone(config_for(**{"runtime.precision": "bf16"}))
    images = uint8_batch(photos, fp32)
    a, b = fp32.embed(images), bf16.embed(images)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert (a * b).sum(axis=1).min() > 0.99


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile (inductor) needs a C compiler")
def test_compiled_backbone_writes_the_eager_vectors(tmp_path, photo_tars, config_for):
    import pyarrow.parquet as pq

    from imgindex.pipeline.job import run_embed

    tars = [str(t) for t in photo_tars(count=1, per_shard=2)]
    for name, compile_ in (("eager", False), ("compiled", True)):
        run_embed(tars, str(tmp_path / name), config_for(**{"runtime.batch_size": 2, "runtime.compile": compile_}),
                  progress=False)
    assert hasattr(load_backbone(config_for(**{"runtime.compile": True})).model, "_orig_mod")  # torch.compile's wrapper
    eager, compiled = (pq.read_table(tmp_path / name / "embeddings") for name in ("eager", "compiled"))
    assert compiled.column("key").equals(eager.column("key"))
    np.testing.assert_allclose(np.stack(compiled["embedding"].to_numpy(zero_copy_only=False)),
                               np.stack(eager["embedding"].to_numpy(zero_copy_only=False)), atol=1e-5)
    # a compiled model runs in one lane: torch.compile is not thread-safe
    manifest = json.loads((tmp_path / "compiled" / "_manifest.json").read_text())
    assert manifest["schedule"]["lanes"] == 1 and manifest["config"]["runtime"]["lanes"] == "auto"  # as written


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_cuda(config_for):
    from imgindex.pipeline.schedule import Machine, decide

    runtime = config_for(**{"runtime.precision": "auto", "runtime.device": "auto"}).runtime
    assert decide(runtime, Machine(cores=2, gpus=0)).precision == "fp32"
    assert decide(runtime, Machine(cores=2, gpus=1)).precision == "bf16"
    runtime.precision = "fp32"
    assert decide(runtime, Machine(cores=2, gpus=1)).precision == "fp32"


def test_a_backbone_runs_where_the_schedule_says(config_for):
    """The model follows the one decision (schedule.decide), not one of its own."""
    from dataclasses import replace

    from imgindex.pipeline.schedule import Machine, decide

    config = config_for(**{"runtime.precision": "bf16"})
    schedule = decide(config.runtime, Machine(cores=2, gpus=0))
    assert load_backbone(config, replace(schedule, precision="fp32")).precision == "fp32"
    assert load_backbone(config).precision == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_pins_and_matches_cpu(photos, config_for):
    from imgindex.pipeline.batches import Batch

    cpu = load_backbone(config_for())
    gpu = load_backbone(config_for(**{"runtime.device": "cuda", "runtime.precision": "fp32"}))
    batch = Batch("s", uint8_batch(photos, cpu), {}).pin_memory()
    assert batch.images.is_pinned()
    np.testing.assert_allclose(gpu.embed(batch.images), cpu.embed(batch.images), atol=1e-4)


def test_auto_batch_size_keeps_headroom_below_the_largest_that_fits():
    from imgindex.errors import ConfigError
    from imgindex.pipeline.model import largest_fitting

    assert largest_fitting(lambda size: size <= 700) == 408  # 512 fitted, 1024 did not: 80% of 512
    assert largest_fitting(lambda size: size <= 8) == 8
    assert largest_fitting(lambda size: True, limit=256) == 200
    with pytest.raises(ConfigError, match="smaller --batch-size"):
        largest_fitting(lambda size: False)


def test_auto_batch_size_and_workers_are_resolved_and_recorded(tmp_path, photo_tars, config_for):
    from imgindex.pipeline.job import run_embed

    run_embed([str(t) for t in photo_tars(count=1, per_shard=2)], str(tmp_path / "out"),
              config_for(**{"runtime.batch_size": "auto", "runtime.workers": "auto"}), progress=False)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    schedule, written = manifest["schedule"], manifest["config"]["runtime"]
    size = schedule["batch_size"]
    assert isinstance(size, int) and size >= 8
    assert schedule["device"] == "cpu" and size == 16
    assert schedule["workers"] == 0  # on a CPU the decode runs in this process (in lanes)
    assert written["batch_size"] == written["workers"] == "auto"  # the config stays as the user wrote it


def test_auto_workers_use_the_cores_of_this_process_and_leave_one_for_it():
    from imgindex.pipeline.schedule import MAX_AUTO_WORKERS, auto_workers

    assert auto_workers("cpu", 64) == 0
    assert auto_workers("cuda", 16) == 15
    assert auto_workers("cuda", 2) == 1 and auto_workers("cuda", 1) == 1
    assert auto_workers("cuda", 224) == MAX_AUTO_WORKERS


def test_procs_get_disjoint_shares_of_the_cores():
    from imgindex.executors.processes import core_shares

    shares = core_shares(list(range(16)), 3)
    assert [len(s) for s in shares] == [5, 5, 6]
    assert sorted(c for s in shares for c in s) == list(range(16))
    assert core_shares([0, 1], 4) == [[], [], [], []]  # fewer cores than processes: no pinning
