"""The embeddings directory's typed records (formats/records.py): files written by the version
before them still read, damaged ones are Corrupt naming the file and the field, identity changes
are found field by field, and a record survives its own JSON."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from imgindex.errors import Corrupt
from imgindex.formats.embeddings_dir import MANIFEST, EmbeddingsDir, EmbeddingStore
from imgindex.formats.index_dir import IndexDir, IndexManifest, data_files
from imgindex.formats.records import (IDENTITY_FIELDS, ROW_FIELDS, EmbeddingsManifest, PartRow, ShardStats, add_row,
                                      part_schema, row_columns)

# What `imgindex embed --config test` wrote before the records (keys sorted, indented), verbatim.
OLD_MANIFEST = r'''{
  "config": {
    "decode": {
      "alpha_background": [
        255,
        255,
        255
      ],
      "draft": false,
      "max_pixels": 89478485
    },
    "model": {
      "checkpoint": null,
      "name": "xcit_nano_12_p16_224.fb_in1k",
      "normalize": true,
      "pretrained": false,
      "weights_package": null
    },
    "runtime": {
      "batch_size": 8,
      "compile": false,
      "device": "cpu",
      "lanes": "auto",
      "precision": "auto",
      "workers": 0
    },
    "seed": 0,
    "source": {
      "folder_shard_size": 4,
      "image_column": null,
      "list_column": "path",
      "max_file_bytes": 1073741824,
      "read_timeout_s": 60.0
    }
  },
  "created": "2026-12-02T13:54:28+00:00",
  "data_config": {
    "crop_mode": "center",
    "crop_pct": 1.0,
    "input_size": [
      3,
      224,
      224
    ],
    "interpolation": "bicubic",
    "mean": [
      0.485,
      0.456,
      0.406
    ],
    "std": [
      0.229,
      0.224,
      0.225
    ]
  },
  "decode": {
    "alpha_background": [
      255,
      255,
      255
    ],
    "draft": false,
    "max_pixels": 89478485,
    "mode": "pil; exif_transpose; 16/32-bit integers scaled by the bits they use; float from [0,1] or min-max; transparency composited on background; convert RGB"
  },
  "device": "cpu",
  "dim": 128,
  "dtype": "float32",
  "format": "imgindex.embeddings/1",
  "model": {
    "architecture": "xcit_nano_12_p16_224",
    "name": "xcit_nano_12_p16_224.fb_in1k",
    "num_classes": 0,
    "pooled": true,
    "tag": "fb_in1k"
  },
  "normalized": true,
  "precision": "fp32",
  "preprocess": [
    "Resize(size=224, interpolation=bicubic, max_size=None, antialias=True)",
    "CenterCrop(size=(224, 224))",
    "MaybeToTensor()",
    "Normalize(mean=tensor([0.4850, 0.4560, 0.4060]), std=tensor([0.2290, 0.2240, 0.2250]))"
  ],
  "schedule": {
    "ahead": 0,
    "batch_size": 8,
    "compile": false,
    "decode": "lanes",
    "device": "cpu",
    "lanes": 2,
    "pin_memory": false,
    "precision": "fp32",
    "threads": 2,
    "workers": 0
  },
  "versions": {
    "pyarrow": "26.0.1",
    "python": "3.11.7",
    "timm": "1.0.31",
    "torch": "2.14.1+cu130"
  },
  "weights": {
    "seed": 0,
    "sha256": "ab0bc348de41fa5a5ec0db6e8f9a83e5cd7b86b34e2c8f5a7c0c1c5121a0336c",
    "source": "random"
  }
}'''
# benchmarks/synthetic.py's manifest as the dict builder wrote it: none of the fields of how a job ran.
OLD_SYNTHETIC_MANIFEST = '{"data_config": {}, "decode": {}, "dim": 8, "dtype": "float32", "format": ' \
    '"imgindex.embeddings/1", "model": {"name": "synthetic"}, "normalized": true, "precision": "fp32", ' \
    '"preprocess": [], "weights": {"sha256": null, "source": "synthetic"}}'
# An index manifest the dict literal in indexes/build.py wrote (a Flat index of synthetic vectors).
OLD_INDEX_MANIFEST = '{"adds": [], "build": {"eval_queries": 1000, "executor": {"asked": "in-process", "kind": "local", "restarts": 0, "resumed_tasks": 0, "retried": 0, "tasks": 2, "workers": 1}, "flat_threshold": 50000, "index_key": null, "max_memory": "16G", "max_train": null, "on_disk": "auto", "seed": 0, "target_recall": 0.95, "train_per_list": 50, "train_size": 0}, "count": 300, "created": "2026-12-02T14:11:52+00:00", "dim": 8, "embeddings": {"data_config": {}, "decode": {}, "dim": 8, "dtype": "float32", "format": "imgindex.embeddings/1", "model": {"name": "synthetic"}, "normalized": true, "precision": "fp32", "preprocess": [], "weights": {"sha256": null, "source": "synthetic"}}, "embeddings_dir": "/data/syn", "factory": "Flat", "faiss_gpus": 0, "files": {"ids.arrow": {"bytes": 7682, "sampled_sha256": "f60171af2dc336624a63df73479944378301c4fd064d08ae1da93e2d20f12275", "sha256": "f60171af2dc336624a63df73479944378301c4fd064d08ae1da93e2d20f12275"}, "ids.parquet": {"bytes": 2567, "sampled_sha256": "ffe8f7765726c4d763f8c8f7665d5eb76e02b8a6645a07da3ee1454ac182d871", "sha256": "ffe8f7765726c4d763f8c8f7665d5eb76e02b8a6645a07da3ee1454ac182d871"}, "index.faiss": {"bytes": 9645, "sampled_sha256": "ad6b582b1316355cce86658f090498fc8935e52e79de709636ceac256e356634", "sha256": "ad6b582b1316355cce86658f090498fc8935e52e79de709636ceac256e356634"}, "keys.arrow": {"bytes": 9978, "sampled_sha256": "965cbaba3ec10c23ab8c4daf82d968ccfd8cc702159e78ffd149cfe926d14777", "sha256": "965cbaba3ec10c23ab8c4daf82d968ccfd8cc702159e78ffd149cfe926d14777"}}, "format": "imgindex.index/1", "mapped_ids": true, "metric": "inner_product", "normalized": true, "notes": [], "on_disk": false, "parts": [{"dir": "/data/syn", "file": {"bytes": 12276, "sampled_sha256": "365db74710fda2b1b01c14705dde4469a616154e8e90baeb5fecdfebf9f0ff93"}, "rows": 200, "shard": "syn-00000"}, {"dir": "/data/syn", "file": {"bytes": 7896, "sampled_sha256": "15905a225da4b5e3b425d1b4a99bd58b2aae75ac16e4bc7e693244d06a0fadbf"}, "rows": 100, "shard": "syn-00001"}], "recall_at_10": 1.0, "recall_curve": [], "recall_queries": 300, "search_params": {}, "selection": "300 vectors <= 50,000: exact search (Flat, 10.3 KB)", "timings": {"add_s": 0.087, "ground_truth_s": 0.005, "merge_s": 0.015, "sample_s": 0.009, "total_s": 0.15, "train_s": 0.0, "tune_s": 0.02, "write_s": 0.006}, "train_residual": null, "versions": {"faiss": "1.15.1", "pyarrow": "26.0.1", "python": "3.11.7"}}'
OLD_STATS = r'''{
  "batch_size": 8,
  "decode_seconds": 0.125,
  "failures": 1,
  "failures_by_error": {
    "not_an_image": 1
  },
  "finished": "2026-12-02T13:54:28+00:00",
  "images_per_s": 10.14,
  "kind": "folder",
  "model_seconds": 0.083,
  "near_constant": 0,
  "rows": 3,
  "samples": 4,
  "seconds": 0.296,
  "shard": "imgs-00000",
  "skipped_members": {},
  "source": "file:///data/imgs",
  "worker": "local"
}'''
# benchmarks/synthetic.py's stats marker as it was written before: the counts only.
OLD_SYNTHETIC_STATS = '{"shard": "syn-00000", "kind": "synthetic", "source": "synthetic", "samples": 5, "rows": 5, ' \
    '"failures": 0}'


def _embeddings_dir(tmp_path, manifest_text: str) -> str:
    (tmp_path / MANIFEST).write_text(manifest_text)
    return str(tmp_path)


def test_a_manifest_written_before_the_records_reads_and_writes_back_the_same_fields(tmp_path):
    emb = EmbeddingsDir(_embeddings_dir(tmp_path, OLD_MANIFEST))
    manifest = emb.manifest
    assert (emb.dim, emb.normalized) == (128, True)
    assert manifest.model.name == "xcit_nano_12_p16_224.fb_in1k" and manifest.weights_source == "random"
    assert manifest.config["model"]["pretrained"] is False and manifest.schedule["lanes"] == 2
    assert json.loads(manifest.to_json()) == json.loads(OLD_MANIFEST)  # the same names and values on disk


def test_an_old_manifest_without_the_newer_fields_and_with_unknown_ones_reads(tmp_path):
    text = json.dumps({**json.loads(OLD_SYNTHETIC_MANIFEST), "written_by": "a later version"})
    manifest = EmbeddingsDir(_embeddings_dir(tmp_path, text)).manifest
    assert manifest.dim == 8 and manifest.config is None and manifest.weights_sha256 is None
    assert manifest.identity_changes(EmbeddingsManifest.from_json(OLD_SYNTHETIC_MANIFEST, "x")) == []


@pytest.mark.parametrize("damage, field", [
    (lambda m: m.update(dim="128"), "$.dim"),
    (lambda m: m.update(dim=0), "$.dim"),
    (lambda m: m.pop("normalized"), "normalized"),
    (lambda m: m["model"].pop("name"), "name"),
    (lambda m: m.update(weights=[1]), "$.weights"),
])
def test_a_damaged_manifest_is_corrupt_naming_the_file_and_the_field(tmp_path, damage, field):
    manifest = json.loads(OLD_MANIFEST)
    damage(manifest)
    with pytest.raises(Corrupt) as caught:
        EmbeddingsDir(_embeddings_dir(tmp_path, json.dumps(manifest)))
    message = str(caught.value)
    assert f"{tmp_path}/{MANIFEST}" in message and field in message and "\n" not in message


def test_a_manifest_that_is_not_json_is_corrupt(tmp_path):
    with pytest.raises(Corrupt, match=f"{tmp_path}/{MANIFEST} is not valid JSON"):
        EmbeddingsDir(_embeddings_dir(tmp_path, OLD_MANIFEST[:100]))


CHANGES = {
    "model": lambda m: m["model"].update(name="resnet50"),
    "weights": lambda m: m["weights"].update(sha256="0" * 64),
    "data_config": lambda m: m["data_config"].update(crop_pct=0.9),
    "preprocess": lambda m: m["preprocess"].pop(),
    "dim": lambda m: m.update(dim=256),
    "dtype": lambda m: m.update(dtype="float16"),
    "normalized": lambda m: m.update(normalized=False),
    "precision": lambda m: m.update(precision="bf16"),
    "decode": lambda m: m["decode"].update(draft=True),
}


@pytest.mark.parametrize("field", IDENTITY_FIELDS)
def test_identity_changes_name_each_field_that_decides_the_vectors(field):
    old = EmbeddingsManifest.from_json(OLD_MANIFEST, "old")
    changed = json.loads(OLD_MANIFEST)
    CHANGES[field](changed)
    new = EmbeddingsManifest.from_json(json.dumps(changed), "new")
    assert old.identity_changes(new) == [field] and new.identity_changes(old) == [field]


def test_how_a_job_ran_and_where_weights_came_from_are_no_identity():
    changed = json.loads(OLD_MANIFEST)
    changed.update(created="2030-01-01T00:00:00+00:00", device="cuda", schedule={}, versions={})
    changed["model"]["tag"] = None
    changed["weights"]["source"] = "checkpoint"
    changed["weights"]["path"] = "/elsewhere/weights.safetensors"
    old = EmbeddingsManifest.from_json(OLD_MANIFEST, "old")
    assert old.identity_changes(EmbeddingsManifest.from_json(json.dumps(changed), "new")) == []


def test_a_store_refuses_a_manifest_with_another_identity(tmp_path):
    store = EmbeddingStore(str(tmp_path))
    store.prepare(EmbeddingsManifest.from_json(OLD_MANIFEST, "old"), overwrite=False)
    changed = json.loads(OLD_MANIFEST)
    changed["precision"] = "bf16"
    with pytest.raises(Exception, match="changed: precision"):
        store.prepare(EmbeddingsManifest.from_json(json.dumps(changed), "new"), overwrite=False)
    assert EmbeddingsDir(str(tmp_path)).manifest == EmbeddingsManifest.from_json(OLD_MANIFEST, "old")


def _with_stats(tmp_path, texts: dict[str, str]) -> EmbeddingsDir:
    emb = EmbeddingsDir(_embeddings_dir(tmp_path, OLD_MANIFEST))
    (tmp_path / "_stats").mkdir()
    for shard, text in texts.items():
        (tmp_path / "_stats" / f"part-{shard}.json").write_text(text)
    return emb


def test_stats_markers_written_before_the_records_read_with_their_attributes(tmp_path):
    sources = _with_stats(tmp_path, {"imgs-00000": OLD_STATS, "syn-00000": OLD_SYNTHETIC_STATS}).shard_sources()
    stats = sources["imgs-00000"]
    assert (stats.kind, stats.source, stats.rows, stats.failures) == ("folder", "file:///data/imgs", 3, 1)
    assert stats.failures_by_error == {"not_an_image": 1} and stats.parquet is None
    synthetic = sources["syn-00000"]
    assert synthetic.skipped_members == {} and synthetic.near_constant == 0 and synthetic.model_seconds is None
    assert json.loads(stats.to_json()) == {**json.loads(OLD_STATS), "parquet": None}
    assert ShardStats.from_json(stats.to_json(), "again") == stats


@pytest.mark.parametrize("text, field", [
    (OLD_STATS.replace('"rows": 3', '"rows": 2'), "2 rows + 1 failures != 4 samples"),
    (OLD_STATS.replace('"rows": 3', '"rows": "3"'), "$.rows"),
    (OLD_STATS.replace('"shard": "imgs-00000",', ''), "shard"),
    (OLD_STATS[:40], "not valid JSON"),
])
def test_a_damaged_stats_marker_is_corrupt_naming_the_file(tmp_path, text, field):
    emb = _with_stats(tmp_path, {"imgs-00000": text})
    with pytest.raises(Corrupt) as caught:
        emb.shard_sources()
    assert str(tmp_path / "_stats" / "part-imgs-00000.json") in str(caught.value) and field in str(caught.value)


def test_a_stats_marker_that_does_not_add_up_cannot_be_made():
    with pytest.raises(ValueError, match="1 rows \\+ 0 failures != 2 samples"):
        ShardStats(shard="s", samples=2, rows=1, failures=0)


def test_the_part_row_gives_the_columns_and_schema_of_parts_written_before():
    assert ROW_FIELDS == ("key", "key_bytes", "width", "height", "bytes", "member_offset", "grayscale", "sha256",
                          "phash", "caption", "json", "url")
    old_schema = pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("embedding", pa.list_(pa.float32(), 4)),
        ("key_bytes", pa.binary()), ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()),
        ("member_offset", pa.int64()), ("grayscale", pa.bool_()), ("sha256", pa.string()), ("phash", pa.int64()),
        ("caption", pa.string()), ("json", pa.string()), ("url", pa.string())])
    assert part_schema(4).equals(old_schema)
    columns = row_columns()
    add_row(columns, PartRow(key="a", key_bytes=None, width=3, height=2, bytes=10, member_offset=512, grayscale=False,
                             sha256="ab", phash=-5, caption="c", json=None, url=None))
    assert columns["key"] == ["a"] and columns["member_offset"] == [512] and columns["phash"] == [-5]
    assert list(columns) == list(ROW_FIELDS)


def test_an_index_manifest_with_a_damaged_embeddings_manifest_is_corrupt(tmp_path):
    manifest = {"format": "imgindex.index/1", "embeddings": {"dim": 8}, "embeddings_dir": "/e", "count": 0,
                "dim": 8, "parts": [], "factory": "Flat", "files": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Corrupt, match="manifest.json is damaged .*model.*: rebuild the index"):
        IndexDir(str(tmp_path)).read_manifest()


def test_an_index_manifest_written_before_the_records_reads_and_round_trips(tmp_path):
    (tmp_path / "manifest.json").write_text(OLD_INDEX_MANIFEST)
    manifest = IndexDir(str(tmp_path)).read_manifest()
    assert (manifest.factory, manifest.count, manifest.dim, manifest.recall_at_10) == ("Flat", 300, 8, 1.0)
    assert [(p.shard, p.rows, p.dir) for p in manifest.parts] == [("syn-00000", 200, "/data/syn"),
                                                                  ("syn-00001", 100, "/data/syn")]
    assert manifest.embeddings.model.name == "synthetic" and manifest.mapped_ids and not manifest.on_disk
    assert manifest.build["executor"]["kind"] == "local" and manifest.files["index.faiss"]["bytes"] == 9645
    assert IndexManifest.from_json(manifest.to_json(), "again") == manifest
    written = json.loads(manifest.to_json())
    old = json.loads(OLD_INDEX_MANIFEST)
    assert {k: v for k, v in written.items() if k in old and k != "embeddings"} == \
        {k: v for k, v in old.items() if k != "embeddings"}
    # fields the --add segments brought: an index built before them has none (its data files are as listed)
    assert {k: written[k] for k in set(written) - set(old)} == {"segments": [], "index_file": None,
                                                                 "recall_set": None, "recall_covers": None}
    assert data_files(manifest) == ("index.faiss", "ids.parquet", "ids.arrow", "keys.arrow")


@pytest.mark.parametrize("damage, field", [
    (lambda m: m.update(count="300"), "$.count"),
    (lambda m: m["parts"][1].pop("rows"), "$.parts[1]"),
    (lambda m: m.update(parts=3), "$.parts"),
    (lambda m: m.pop("embeddings_dir"), "embeddings_dir"),
    (lambda m: m["files"].pop("keys.arrow"), "keys.arrow"),
])
def test_a_damaged_index_manifest_is_corrupt_naming_the_file_and_the_field(tmp_path, damage, field):
    manifest = json.loads(OLD_INDEX_MANIFEST)
    damage(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Corrupt) as caught:
        IndexDir(str(tmp_path)).read_manifest()
    message = str(caught.value)
    assert str(tmp_path / "manifest.json") in message and field in message and "rebuild the index" in message
