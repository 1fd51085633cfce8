"""Parquet files holding image bytes as a source: a Hugging Face dataset saved by `datasets`, an
img2dataset `parquet` output (tests/data, written by img2dataset itself), files cut at row groups,
the executors and resume, hostile files, and reading a row back for thumbnails and dedup lists."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgindex.cli import main
from imgindex.errors import ConfigError
from imgindex.formats.samples import read_images, sample_location
from imgindex.pipeline.config import SourceConfig
from imgindex.pipeline.demo_corpus import jpeg_bytes
from imgindex.pipeline.job import run_embed
from imgindex.pipeline.sources import plan_shards, read_shard

IMG2DATASET = Path(__file__).parent / "data" / "img2dataset-00000.parquet"


def outputs(out: Path) -> tuple[list[dict], list[dict], dict[str, dict]]:
    rows = pq.read_table(out / "embeddings").to_pylist() if list((out / "embeddings").glob("*.parquet")) else []
    failures = pq.read_table(out / "failures").to_pylist() if list((out / "failures").glob("*.parquet")) else []
    stats = {p.stem[len("part-"):]: json.loads(p.read_text()) for p in (out / "_stats").glob("*.json")}
    return rows, failures, stats


@pytest.fixture
def images(photos) -> dict[str, bytes]:
    """Small JPEGs of distinct photos."""
    return {name: jpeg_bytes(photos[name].resize((64, 48))) for name in ("coffee", "chelsea", "rocket", "astronaut",
                                                                          "camera", "coins")}


def hf_dataset(folder: Path, images: dict[str, bytes], files: int = 2, embed: bool = True) -> list[Path]:
    """A dataset built and saved by the `datasets` library: an Image column from files, cast as
    the docs show, its images embedded as the hub stores them (or left as paths), one Parquet
    file per shard; the last row has no image."""
    import datasets
    from datasets.table import embed_table_storage

    datasets.disable_progress_bars()
    originals = folder / "originals"
    originals.mkdir(parents=True)
    paths = []
    for name, data in images.items():
        (originals / f"{name}.jpg").write_bytes(data)
        paths.append(str(originals / f"{name}.jpg"))
    names = list(images)
    dataset = datasets.Dataset.from_dict({"image": paths + [None], "text": names + ["nothing"],
                                          "label": list(range(len(names) + 1))}).cast_column("image", datasets.Image())
    if embed:
        dataset = dataset.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
    (folder / "data").mkdir()
    written = []
    for index in range(files):
        path = folder / "data" / f"train-{index:05d}-of-{files:05d}.parquet"
        dataset.shard(files, index, contiguous=True).to_parquet(str(path))
        written.append(path)
    return written


def test_a_hugging_face_dataset_saved_to_parquet_embeds_every_row(tmp_path, images, checkpoint):
    files = hf_dataset(tmp_path, images)
    emb = tmp_path / "emb"
    assert main(["embed", str(tmp_path / "data" / "train-*.parquet"), "--out", str(emb), "--config", "test",
                 "--checkpoint", str(checkpoint), "--no-progress"]) == 0
    rows, failures, stats = outputs(emb)
    assert sorted((r["shard"], r["key"]) for r in rows) == [  # seven rows: 4 + 3, the last without an image
        ("train-00000-of-00002", "0"), ("train-00000-of-00002", "1"), ("train-00000-of-00002", "2"),
        ("train-00000-of-00002", "3"), ("train-00001-of-00002", "0"), ("train-00001-of-00002", "1")]
    by_caption = {r["caption"]: r for r in rows}
    assert set(by_caption) == set(images)
    assert json.loads(by_caption["rocket"]["json"]) == {"label": 2, "text": "rocket"}
    assert by_caption["rocket"]["sha256"] == hashlib.sha256(images["rocket"]).hexdigest()
    (failure,) = failures
    assert (failure["shard"], failure["key"], failure["error"]) == ("train-00001-of-00002", "2", "empty")
    for shard, s in stats.items():
        assert s["kind"] == "parquet" and s["samples"] == s["rows"] + s["failures"]
        assert s["parquet"]["image"] == "image" and s["parquet"]["struct"] and s["parquet"]["key"] is None
    second = stats["train-00001-of-00002"]
    # read back by the location rule: row 1 of the second file is the sixth image, row 2 has none
    assert sample_location("parquet", second["source"], "1") == f"{files[1]}#1"
    assert read_images("parquet", second["source"], ["1", "2", "9"], parquet=second["parquet"]) == {
        "1": images[list(images)[5]]}


def test_a_dataset_saved_without_embedding_its_images_fails_each_row_saying_so(tmp_path, images):
    """`cast_column("image", Image())` then `to_parquet` keeps only the paths: each row is an
    `empty` failure whose message says the images are not in the file, none a traceback."""
    (path,) = hf_dataset(tmp_path, dict(list(images.items())[:2]), files=1, embed=False)
    (shard,) = plan_shards([str(path)], SourceConfig())
    samples = list(read_shard(shard))
    assert [(s.key, s.error[0]) for s in samples] == [("0", "empty"), ("1", "empty"), ("2", "empty")]
    assert "not embedded" in samples[0].error[1] and "coffee.jpg" in samples[0].error[1]


def test_an_img2dataset_parquet_output_counts_failed_downloads_as_skipped(tmp_path, checkpoint, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(IMG2DATASET, data / "00000.parquet")
    emb = tmp_path / "emb"
    assert main(["embed", str(data / "*.parquet"), "--out", str(emb), "--config", "test",
                 "--checkpoint", str(checkpoint), "--no-progress"]) == 0
    assert "[skipped: status:failed_to_download=1, status:failed_to_resize=1]" in capsys.readouterr().out
    rows, failures, stats = outputs(emb)
    assert sorted(r["key"] for r in rows) == ["000000000", "000000001", "000000002", "000000003"]
    assert not failures
    coffee = next(r for r in rows if r["key"] == "000000000")
    assert coffee["caption"] == "a photo of coffee" and coffee["url"].endswith("/coffee.jpg")
    assert json.loads(coffee["json"])["status"] == "success" and (coffee["width"], coffee["height"]) == (96, 64)
    s = stats["00000"]
    assert s["skipped_members"] == {"status:failed_to_download": 1, "status:failed_to_resize": 1}
    assert s["samples"] + sum(s["skipped_members"].values()) == pq.ParquetFile(IMG2DATASET).metadata.num_rows
    assert s["parquet"] == {"image": "jpg", "struct": False, "key": "key", "status": True, "row_groups": [0, 1],
                            "first_row": 0}
    source_rows = pq.read_table(IMG2DATASET, columns=["key", "jpg"]).to_pylist()
    expected = {r["key"]: r["jpg"] for r in source_rows if r["key"] in ("000000001", "000000003")}
    assert read_images("parquet", s["source"], ["000000003", "000000001"], parquet=s["parquet"]) == expected


def grouped_file(path: Path, images: dict[str, bytes], groups: int = 5, per_group: int = 2) -> Path:
    """A Parquet file of `groups` row groups with a key column, images cycling through `images`."""
    count = groups * per_group
    data = [list(images.values())[i % len(images)] for i in range(count)]
    table = pa.table({"key": [f"k{i:03d}" for i in range(count)], "png": data})
    pq.write_table(table, path, row_group_size=per_group)
    return path


def test_a_large_file_is_cut_at_row_groups_into_stable_shards_and_a_rerun_resumes(tmp_path, images, config_for):
    path = grouped_file(tmp_path / "big.parquet", images)
    config = config_for(**{"source.folder_shard_size": 4})
    shards = plan_shards([str(path)], config.source)
    assert [(s.name, s.parquet.row_groups, s.parquet.first_row) for s in shards] == [
        ("big-rg00000", (0, 2), 0), ("big-rg00002", (2, 4), 4), ("big-rg00004", (4, 5), 8)]
    out = tmp_path / "emb"
    run_embed([str(path)], str(out), config, progress=False)
    rows, _, stats = outputs(out)
    assert sorted(r["key"] for r in rows) == [f"k{i:03d}" for i in range(10)]
    assert {r["key"] for r in rows if r["shard"] == "big-rg00002"} == {"k004", "k005", "k006", "k007"}
    (out / "_stats" / "part-big-rg00002.json").unlink()  # as if the job died in that shard
    before = {name: (out / "embeddings" / f"part-{name}.parquet").stat().st_mtime_ns for name in stats}
    again = run_embed([str(path)], str(out), config_for(**{"source.folder_shard_size": 4}), progress=False)
    assert (again.shards_skipped, again.shards_done, again.images) == (2, 1, 4)
    after = {name: (out / "embeddings" / f"part-{name}.parquet").stat().st_mtime_ns for name in stats}
    assert [name for name in stats if before[name] != after[name]] == ["big-rg00002"]
    assert sorted(r["key"] for r in outputs(out)[0]) == [f"k{i:03d}" for i in range(10)]


def test_procs_pool_embeds_parquet_shards_as_the_in_process_run(tmp_path, images, config_for):
    from imgindex.executors.placement import Executor

    path = grouped_file(tmp_path / "big.parquet", images, groups=4)
    single, pooled = tmp_path / "single", tmp_path / "pooled"
    run_embed([str(path)], str(single), config_for(**{"source.folder_shard_size": 4}), progress=False)
    summary = run_embed([str(path)], str(pooled), config_for(**{"source.folder_shard_size": 4}), progress=False,
                        executor=Executor("procs", 2))
    assert summary.images == 8 and not summary.shards_failed
    a = {(r["shard"], r["key"]): r["embedding"] for r in outputs(single)[0]}
    b = {(r["shard"], r["key"]): r["embedding"] for r in outputs(pooled)[0]}
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)


def test_a_parquet_file_list_keeps_working_beside_parquet_images(tmp_path, images):
    (tmp_path / "coffee.jpg").write_bytes(images["coffee"])
    pq.write_table(pa.table({"path": ["coffee.jpg"], "caption": ["a cup"]}), tmp_path / "list.parquet")
    grouped_file(tmp_path / "rows.parquet", images, groups=1)
    shards = plan_shards([str(tmp_path / "list.parquet"), str(tmp_path / "rows.parquet")], SourceConfig())
    assert [(s.name, s.kind) for s in shards] == [("list-00000", "list"), ("rows", "parquet")]
    assert [(s.key, s.caption) for s in read_shard(shards[0])] == [("coffee.jpg", "a cup")]


def _struct_images(data: list[bytes | None]) -> pa.Array:
    return pa.array([{"bytes": d, "path": None} for d in data],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


@pytest.mark.parametrize("columns, image_column, message", [
    ({"path2": ["a.jpg"], "n": [1]}, None, "holds no image column"),
    ({"png": [b"x"]}, "jpg", "has no column 'jpg' (source.image_column)"),
    ({"png": [b"x"], "caption": ["a cat"]}, "caption", "holds string, not image bytes"),
    ({"image": [b"x"], "mask": [b"y"]}, None, "several image columns (image, mask)"),
])
def test_a_parquet_file_with_no_usable_image_column_stops_the_plan_with_one_line(tmp_path, columns, image_column,
                                                                                 message):
    table = pa.table({name: _struct_images(v) if name == "mask" else v for name, v in columns.items()})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ConfigError) as caught:
        plan_shards([str(tmp_path / "bad.parquet")], SourceConfig(image_column=image_column))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_parquet_input_is_one_line_before_torch_loads(tmp_path, checkpoint):
    pq.write_table(pa.table({"caption": ["a cat"], "id": [1]}), tmp_path / "bad.parquet")
    script = ("import sys; from imgindex.cli import main; code = main(sys.argv[1:]); "
              "print('torch' in sys.modules, 'timm' in sys.modules); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, "embed", str(tmp_path / "bad.parquet"), "--out",
                             str(tmp_path / "out"), "--config", "test", "--checkpoint", str(checkpoint)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout.split() == ["False", "False"]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("imgindex: error: Parquet file") and "source.image_column" in line
    assert not (tmp_path / "out").exists()


def claimed_2gb_cell(path: Path, images: dict[str, bytes]) -> Path:
    """Three one-row groups, uncompressed and plain; the middle cell's length prefix then patched
    to claim 2 GB (a hostile or damaged file; its footer is intact)."""
    middle = images["chelsea"]
    pq.write_table(pa.table({"key": ["a", "b", "c"], "jpg": [images["coffee"], middle, images["rocket"]]}), path,
                   row_group_size=1, compression="none", use_dictionary=False, write_statistics=False)
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<I", len(middle)) + middle)
    assert at > 0
    data[at:at + 4] = struct.pack("<I", 2**31 - 8)
    path.write_bytes(bytes(data))
    return path


def test_hostile_parquet_files_give_failures_never_a_traceback(tmp_path, images, photos, config_for):
    good = images["coffee"]
    truncated_jpeg = good[: len(good) // 2]
    hostile = pa.table({
        "__key__": ["ok", "null", "zero", "text", "cut", "ok", None, "also-ok"],
        "jpg": [good, None, b"", b"not an image at all\n" * 20, truncated_jpeg, images["rocket"], good,
                images["camera"]],
    })
    pq.write_table(hostile, tmp_path / "hostile.parquet", row_group_size=3)
    whole = tmp_path / "whole.parquet"
    grouped_file(whole, images, groups=2)
    (tmp_path / "truncated.parquet").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    claimed_2gb_cell(tmp_path / "claims.parquet", images)
    out = tmp_path / "out"
    summary = run_embed([str(tmp_path / n) for n in ("hostile.parquet", "truncated.parquet", "claims.parquet")],
                        str(out), config_for(**{"source.folder_shard_size": 100}), progress=False)
    rows, failures, stats = outputs(out)
    assert sorted((r["shard"], r["key"]) for r in rows) == [
        ("claims", "a"), ("claims", "c"), ("hostile", "also-ok"), ("hostile", "ok")]
    assert sorted((f["shard"], f["key"], f["error"]) for f in failures) == [
        ("claims", "b", "unreadable"),
        ("hostile", "#row-6", "no_key"), ("hostile", "cut", "truncated"), ("hostile", "null", "empty"),
        ("hostile", "ok", "duplicate_key"), ("hostile", "text", "not_an_image"), ("hostile", "zero", "empty"),
        ("truncated", "#unreadable", "bad_shard")]
    assert "row group 1" in next(f["message"] for f in failures if f["key"] == "b")
    assert "not a readable Parquet file" in next(f["message"] for f in failures if f["shard"] == "truncated")
    for s in stats.values():
        assert s["samples"] == s["rows"] + s["failures"]
    assert stats["hostile"]["samples"] == 8 and summary.images == 4


def test_a_file_changed_after_the_plan_is_one_bad_shard_failure(tmp_path, images):
    path = grouped_file(tmp_path / "moving.parquet", images, groups=1)
    (shard,) = plan_shards([str(path)], SourceConfig())
    pq.write_table(pa.table({"id": [1], "png": [images["coffee"]]}), path)  # rewritten: no `key` column now
    (sample,) = read_shard(shard)
    assert sample.error == ("bad_shard", "column 'key' is gone: the file changed after the job was planned")


def test_a_cell_over_the_byte_limit_is_too_large_and_a_one_row_group_declaring_it_is_not_read(
        tmp_path, images, monkeypatch):
    big = images["coffee"] + os.urandom(200_000)
    pq.write_table(pa.table({"key": ["small", "big"], "image": _struct_images([images["rocket"], big])}),
                   tmp_path / "a.parquet", row_group_size=1)  # the big image alone in group 1
    pq.write_table(pa.table({"key": ["other", "big-in-group"], "image": _struct_images([images["camera"], big])}),
                   tmp_path / "b.parquet", row_group_size=2)
    asked: list[tuple[int, list[str]]] = []
    real = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, row_groups=None, columns=None, **kw):
        asked.append((row_groups[0], list(columns)))
        return real(self, batch_size, row_groups, columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    found = {}
    for shard in plan_shards([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], SourceConfig()):
        for sample in read_shard(shard, max_bytes=20_000):
            found[sample.key] = sample
    assert found["small"].data == images["rocket"] and found["other"].data == images["camera"]
    assert found["big"].error[0] == "too_large" and "declares" in found["big"].error[1]
    assert found["big-in-group"].error[0] == "too_large" and found["big-in-group"].data is None
    assert ["image" in columns for _, columns in asked] == [True, False, True]  # a.parquet's group 1: not read


def test_thumbnails_and_dedup_lists_reach_a_parquet_row_by_its_row_group(tmp_path, images, checkpoint, monkeypatch):
    distinct = dict(list(images.items())[:4])
    data = list(distinct.values()) + [distinct["rocket"]]  # k004 is a byte copy of k002
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"key": [f"k{i:03d}" for i in range(5)], "jpg": data}), path, row_group_size=2)
    emb, idx, dedup = tmp_path / "emb", tmp_path / "idx", tmp_path / "dedup"
    common = ["--no-progress"]
    assert main(["embed", str(path), "--out", str(emb), "--config", "test", "--checkpoint", str(checkpoint),
                 *common]) == 0
    assert main(["index", str(emb), "--out", str(idx), *common]) == 0
    assert main(["dedup", "--index", str(idx), "--out", str(dedup), "--method", "exact", *common]) == 0
    assert (dedup / "remove.txt").read_text() == f"{path}#k004\n"
    assert (dedup / "keep.txt").read_text() == f"{path}#k002\n"
    report = (dedup / "report.html").read_text()
    assert "no preview" not in report and "data:image/jpeg;base64," in report
    read: list[tuple[int, list[str]]] = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, columns=None, **kw: read.append((i, list(columns))) or real(self, i, columns,
                                                                                                     **kw))
    stats = json.loads((emb / "_stats" / "part-corpus-rg00002.json").read_text())  # the test config: 4 rows a shard
    assert read_images("parquet", stats["source"], ["k004"], parquet=stats["parquet"]) == {"k004": data[4]}
    assert [group for group, columns in read if "jpg" in columns] == [2]  # the image of one row group alone


def test_search_html_shows_parquet_rows(tmp_path, images, checkpoint):
    path = grouped_file(tmp_path / "corpus.parquet", images, groups=2)
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    assert main(["embed", str(path), "--out", str(emb), "--config", "test", "--checkpoint", str(checkpoint),
                 "--no-progress"]) == 0
    assert main(["index", str(emb), "--out", str(idx), "--no-progress"]) == 0
    query = tmp_path / "q.jpg"
    query.write_bytes(images["coffee"])
    page = tmp_path / "page.html"
    assert main(["search", "--index", str(idx), "--image", str(query), "-k", "3", "--html", str(page)]) == 0
    assert page.read_text().count("data:image/jpeg;base64,") >= 4  # the query and its three hits
    assert "no preview" not in page.read_text()


def test_row_number_keys_read_back_from_their_row_group(tmp_path, images):
    path = tmp_path / "plain.parquet"
    data = list(images.values())
    pq.write_table(pa.table({"webp": data}), path, row_group_size=2)
    shards = plan_shards([str(path)], SourceConfig(folder_shard_size=4))
    keys = {s.name: [x.key for x in read_shard(s)] for s in shards}
    assert keys == {"plain-rg00000": ["0", "1", "2", "3"], "plain-rg00002": ["4", "5"]}
    record = shards[1].parquet.to_dict()
    assert read_images("parquet", shards[1].url, ["5", "1"], parquet=record) == {"5": data[5]}
    assert read_images("parquet", path.as_uri(), ["1", "x"]) == {"1": data[1]}  # no record: the whole file
    assert Image.open(io.BytesIO(read_images("parquet", str(path), ["0"])["0"])).size == (64, 48)
