"""Inputs nobody here wrote: names in other encodings, members that are no files, duplicate
keys, corrupt headers, degenerate and unsupported images. Nothing crashes the job, nothing
vanishes, nothing is counted twice."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgindex.pipeline.demo_corpus import jpeg_bytes
from imgindex.pipeline.job import run_embed


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = kind, len(data) if kind == tarfile.REGTYPE else 0, link, 0o644
    return info


def write_members(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], encoding: str = "utf-8") -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding=encoding) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def outputs(out: Path) -> tuple[list[dict], list[dict], list[dict]]:
    rows = pq.read_table(out / "embeddings").to_pylist() if list((out / "embeddings").glob("*.parquet")) else []
    failures = pq.read_table(out / "failures").to_pylist() if list((out / "failures").glob("*.parquet")) else []
    stats = [json.loads(p.read_text()) for p in sorted((out / "_stats").glob("*.json"))]
    return rows, failures, stats


@pytest.fixture
def jpeg(photos) -> bytes:
    return jpeg_bytes(photos["coffee"].resize((64, 48)))


def test_names_that_are_not_utf8_are_escaped_keys_with_their_bytes_kept(tmp_path, jpeg, config_for):
    tar = write_members(tmp_path / "latin-00000.tar", [(member("café.jpg", jpeg), jpeg), (member("ok.jpg", jpeg), jpeg)],
                        encoding="latin-1")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpeg)
    summary = run_embed([str(tar), str(folder)], str(tmp_path / "out"), config_for(), progress=False)
    rows, failures, _ = outputs(tmp_path / "out")
    assert summary.images == 3 and not failures
    by_key = {r["key"]: r for r in rows}
    assert by_key["caf\\xe9"]["key_bytes"] == b"caf\xe9" and by_key["ok"]["key_bytes"] is None
    assert by_key["caf\\xe9.jpg"]["key_bytes"] == b"caf\xe9.jpg"
    assert (folder.parent / "folder" / os.fsdecode(by_key["caf\\xe9.jpg"]["key_bytes"])).is_file()
    from imgindex.formats.samples import read_images

    source = next(json.loads(p.read_text()) for p in (tmp_path / "out" / "_stats").glob("*folder*.json"))
    assert read_images("folder", source["source"], ["caf\\xe9.jpg"]) == {"caf\\xe9.jpg": jpeg}


def test_every_tar_member_is_a_sample_or_a_counted_skip(tmp_path, jpeg, config_for):
    members = [
        (member("a.jpg", jpeg), jpeg),
        (member(".hidden.jpg", jpeg), jpeg),  # outside webdataset's key rule: a sample of its own
        (member("noextension", jpeg), jpeg),  # holds a JPEG: embedded
        (member("notes", b"plain text"), b"plain text"),  # no extension, not an image: a failure
        (member("folder", kind=tarfile.DIRTYPE), b""),
        (member("trailing.jpg/", kind=tarfile.DIRTYPE), b""),
        (member("link.jpg", kind=tarfile.SYMTYPE, link="a.jpg"), b""),
        (member("hard.jpg", kind=tarfile.LNKTYPE, link="a.jpg"), b""),
        (member("pipe", kind=tarfile.FIFOTYPE), b""),
        (member("dev", kind=tarfile.CHRTYPE), b""),
        (member("__meta__", b"{}"), b"{}"),
        (member("b.jpg", jpeg), jpeg),
    ]
    write_members(tmp_path / "odd-00000.tar", members)
    run_embed([str(tmp_path / "odd-00000.tar")], str(tmp_path / "out"), config_for(), progress=False)
    rows, failures, (stats,) = outputs(tmp_path / "out")
    assert sorted(r["key"] for r in rows) == [".hidden.jpg", "a", "b", "noextension"]
    assert [(f["key"], f["error"]) for f in failures] == [("notes", "not_an_image")]
    assert stats["skipped_members"] == {"directory": 2, "symlink": 1, "hardlink": 1, "fifo": 1, "device": 1,
                                        "webdataset_meta": 1}
    assert stats["samples"] == stats["rows"] + stats["failures"] == 5
    assert stats["samples"] + sum(stats["skipped_members"].values()) == len(members)


def test_duplicate_keys_are_failures_not_second_rows(tmp_path, jpeg, config_for):
    other = jpeg_bytes(Image.new("RGB", (32, 32), (10, 200, 30)))
    write_members(tmp_path / "names-00000.tar", [(member("dup.jpg", jpeg), jpeg), (member("other.jpg", other), other),
                                                (member("dup.jpg", other), other), (member("x.jpg", jpeg), jpeg),
                                                (member("x.jpg", other), other)])
    run_embed([str(tmp_path / "names-00000.tar")], str(tmp_path / "out"), config_for(), progress=False)
    rows, failures, (stats,) = outputs(tmp_path / "out")
    assert sorted(r["key"] for r in rows) == ["dup", "other", "x"]
    assert sorted((f["key"], f["error"]) for f in failures) == [("dup", "duplicate_key"), ("x", "duplicate_key")]
    assert stats["samples"] == 5


def test_a_corrupt_header_is_recorded_and_reading_resumes_at_the_next(tmp_path, jpeg, config_for):
    path = write_members(tmp_path / "hurt-00000.tar", [(member(f"{i}.jpg", jpeg), jpeg) for i in range(4)])
    raw = bytearray(path.read_bytes())
    second = 512 + -(-len(jpeg) // 512) * 512  # the second member's header
    raw[second:second + 512] = b"\x5a" * 512
    path.write_bytes(bytes(raw))
    run_embed([str(path)], str(tmp_path / "out"), config_for(), progress=False)
    rows, failures, _ = outputs(tmp_path / "out")
    assert sorted(r["key"] for r in rows) == ["0", "2", "3"]
    (bad,) = failures
    assert bad["error"] == "bad_shard" and f"bytes {second} to" in bad["message"]


def test_a_tar_cut_short_keeps_what_it_read_and_records_the_rest(tmp_path, jpeg, config_for):
    path = write_members(tmp_path / "cut-00000.tar", [(member(f"{i}.jpg", jpeg), jpeg) for i in range(3)])
    path.write_bytes(path.read_bytes()[: 512 * 3 + len(jpeg) // 2 + 1024])
    run_embed([str(path)], str(tmp_path / "out"), config_for(), progress=False)
    rows, failures, (stats,) = outputs(tmp_path / "out")
    assert [r["key"] for r in rows] and all(f["error"] == "bad_shard" for f in failures) and failures
    assert stats["rows"] + stats["failures"] == stats["samples"]


def _tiff(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array)
    assert img.mode == mode
    img.save(buf, "TIFF")
    return buf.getvalue()


def test_high_bit_depth_and_float_images_keep_their_signal():
    from imgindex.pipeline.decode import open_upright

    ramp = np.tile(np.arange(256, dtype=np.uint16) * 16, (32, 1))  # 12-bit data in a 16-bit file
    twelve = np.asarray(open_upright(_tiff(ramp, "I;16"), 10**8).image.convert("L"))
    assert twelve.max() >= 250 and twelve.min() <= 5  # the whole range, not near-black
    floats = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (32, 1))
    shown = np.asarray(open_upright(_tiff(floats, "F"), 10**8).image.convert("L"))
    assert shown.max() >= 250 and shown.min() <= 5


def test_near_constant_images_are_embedded_and_counted(tmp_path, jpeg, config_for):
    blank = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # all transparent: white on the background
    buf = io.BytesIO()
    blank.save(buf, "PNG")
    write_members(tmp_path / "flat-00000.tar", [(member("blank.png", buf.getvalue()), buf.getvalue()),
                                                (member("photo.jpg", jpeg), jpeg)])
    summary = run_embed([str(tmp_path / "flat-00000.tar")], str(tmp_path / "out"), config_for(), progress=False)
    _, _, (stats,) = outputs(tmp_path / "out")
    assert stats["rows"] == 2 and stats["near_constant"] == 1 and summary.near_constant == 1
    assert "1 near-constant image:" in summary.line()


def test_real_but_unsupported_images_are_named_so(jpeg):
    from imgindex.pipeline.decode import SampleError, open_upright

    twelve_bit = bytearray(jpeg)
    sof = twelve_bit.find(b"\xff\xc0")
    twelve_bit[sof + 4] = 12  # the frame's sample precision: a 12-bit JPEG
    with pytest.raises(SampleError) as caught:
        open_upright(bytes(twelve_bit), 10**8)
    assert caught.value.kind == "unsupported" and "12-bit" in str(caught.value)
    with pytest.raises(SampleError) as caught:
        open_upright(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 10**8)
    assert caught.value.kind == "unsupported"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "TIFF")
    tiff = bytearray(buf.getvalue())
    tag = tiff.find(b"\x03\x01\x03\x00")  # the Compression tag (259, SHORT) of the first IFD
    tiff[tag + 8:tag + 10] = (34999).to_bytes(2, "little")  # a compression no decoder knows
    with pytest.raises(SampleError) as caught:
        open_upright(bytes(tiff), 10**8)
    assert caught.value.kind == "unsupported" and "TIFF" in str(caught.value)
    with pytest.raises(SampleError) as caught:
        open_upright(os.urandom(200).replace(b"\xff", b"\x00"), 10**8)
    assert caught.value.kind == "not_an_image"


def test_hidden_names_in_sub_folders_are_samples_of_their_own(tmp_path, jpeg, config_for):
    other = jpeg_bytes(Image.new("RGB", (32, 32), (10, 200, 30)))
    write_members(tmp_path / "hidden-00000.tar", [(member("x/.a.jpg", jpeg), jpeg), (member("x/.b.jpg", other), other),
                                                 (member("x/c.jpg", jpeg), jpeg)])
    run_embed([str(tmp_path / "hidden-00000.tar")], str(tmp_path / "out"), config_for(), progress=False)
    rows, failures, (stats,) = outputs(tmp_path / "out")
    assert sorted(r["key"] for r in rows) == ["x/.a.jpg", "x/.b.jpg", "x/c"] and not failures
    assert stats["samples"] == 3


@pytest.mark.parametrize("content", ["random", "junk_after_members"])
def test_bytes_that_are_no_tar_are_a_recorded_bad_shard(tmp_path, jpeg, config_for, content):
    path = tmp_path / "noise-00000.tar"
    noise = np.random.default_rng(7).bytes(20_000)
    if content == "random":
        path.write_bytes(noise)
    else:
        write_members(path, [(member("a.jpg", jpeg), jpeg)])
        path.write_bytes(path.read_bytes() + noise)
    run_embed([str(path)], str(tmp_path / "out"), config_for(), progress=False)
    rows, failures, (stats,) = outputs(tmp_path / "out")
    assert [r["key"] for r in rows] == ([] if content == "random" else ["a"])
    (bad,) = failures
    assert bad["error"] == "bad_shard" and "no valid header" in bad["message"]
    assert stats["samples"] == stats["rows"] + stats["failures"]


def test_a_member_over_the_byte_limit_is_too_large_and_not_read(tmp_path, jpeg, config_for, monkeypatch):
    big = jpeg + b"\0" * 50_000
    path = write_members(tmp_path / "big-00000.tar", [(member("a.jpg", jpeg), jpeg), (member("big.jpg", big), big),
                                                     (member("b.jpg", jpeg), jpeg)])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "big.jpg").write_bytes(big)
    (folder / "small.jpg").write_bytes(jpeg)
    read_sizes: list[int] = []
    real_extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, info: read_sizes.append(info.size) or real_extract(self, info))
    run_embed([str(path), str(folder)], str(tmp_path / "out"), config_for(**{"source.max_file_bytes": 20_000}),
              progress=False)
    rows, failures, _ = outputs(tmp_path / "out")
    assert sorted(r["key"] for r in rows) == ["a", "b", "small.jpg"]
    assert sorted((f["key"], f["error"]) for f in failures) == [("big", "too_large"), ("big.jpg", "too_large")]
    assert max(read_sizes) == len(jpeg)  # the big member was never extracted


def test_thumbnails_read_the_embedded_member_by_its_recorded_range(tmp_path, jpeg, config_for):
    from imgindex.formats.samples import read_images

    other = jpeg_bytes(Image.new("RGB", (32, 32), (10, 200, 30)))
    path = write_members(tmp_path / "dups-00000.tar", [(member("dup.jpg", jpeg), jpeg), (member("o.jpg", other), other),
                                                      (member("dup.jpg", other), other)])
    run_embed([str(path)], str(tmp_path / "out"), config_for(), progress=False)
    rows, _, _ = outputs(tmp_path / "out")
    ranges = {r["key"]: (r["member_offset"], r["bytes"]) for r in rows}
    assert path.read_bytes()[ranges["o"][0]:][:ranges["o"][1]] == other
    url = path.as_uri()
    # the key that was embedded is the first "dup" (the second is a duplicate_key failure)
    assert read_images("tar", url, ["dup", "o"]) == {"dup": jpeg, "o": other}
    assert read_images("tar", url, ["dup", "o"], ranges) == {"dup": jpeg, "o": other}
    gz = tmp_path / "dups-00001.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.addfile(member("c.jpg", jpeg), io.BytesIO(jpeg))
    run_embed([str(gz)], str(tmp_path / "out-gz"), config_for(), progress=False)
    (row,), _, _ = outputs(tmp_path / "out-gz")
    assert row["key"] == "c" and row["member_offset"] is None  # compressed: no byte range to read


def test_thumbnails_of_an_index_read_one_byte_range_not_the_tar(tmp_path, jpeg, config_for):
    """Searcher.member_ranges gives the recorded range, so a thumbnail is read even when every
    byte before it is junk a scan of the tar could not get past."""
    from imgindex.indexes.build import build_index
    from imgindex.indexes.gallery import fetch_images
    from imgindex.indexes.query import Searcher

    other = jpeg_bytes(Image.new("RGB", (32, 32), (10, 200, 30)))
    path = write_members(tmp_path / "range-00000.tar", [(member(f"{i}.jpg", other), other) for i in range(3)] +
                         [(member("last.jpg", jpeg), jpeg)])
    run_embed([str(path)], str(tmp_path / "emb"), config_for(), progress=False)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    searcher = Searcher(tmp_path / "idx")
    (offset, size), = searcher.member_ranges("range-00000", ["last"]).values()
    raw = bytearray(path.read_bytes())
    raw[:offset] = b"\x5a" * offset  # every header before it destroyed
    path.write_bytes(bytes(raw))
    assert fetch_images(searcher.sources(), [("range-00000", "last")], searcher.member_ranges) == {
        ("range-00000", "last"): jpeg}
    assert fetch_images(searcher.sources(), [("range-00000", "last")]) == {}  # a scan cannot reach it
