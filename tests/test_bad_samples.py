"""A bad sample becomes a failures row with a short error class; odd modes are converted."""
import contextlib
import io
import json
import os
import threading

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from imgindex.pipeline.decode import SampleError, open_upright, phash
from imgindex.pipeline.demo_corpus import photo_files, write_tar
from imgindex.pipeline.job import run_embed

from conftest import bad_and_odd_samples


@pytest.fixture
def bad_shard(tmp_path, photos):
    samples = bad_and_odd_samples(photos["astronaut"])
    members = []
    for key, (ext, data, _) in samples.items():
        members += [(f"{key}.{ext}", data), (f"{key}.txt", f"caption of {key}".encode())]
    members.append(("orphan.txt", b"a caption with no image"))
    return write_tar(tmp_path / "bad-00000.tar", members), samples


def test_every_sample_is_a_row_or_a_failure_with_its_error_class(tmp_path, bad_shard, config_for):
    tar, samples = bad_shard
    out = tmp_path / "out"
    summary = run_embed([str(tar)], str(out), config_for(), progress=False)

    rows = pq.read_table(out / "embeddings" / "part-bad-00000.parquet").to_pydict()
    failures = pq.read_table(out / "failures" / "part-bad-00000.parquet").to_pydict()
    expected_failures = {k: err for k, (_, _, err) in samples.items() if err} | {"orphan": "no_image"}
    assert dict(zip(failures["key"], failures["error"])) == expected_failures
    assert all(failures["message"]) and set(failures["shard"]) == {"bad-00000"}
    assert sorted(rows["key"]) == sorted(k for k, (_, _, err) in samples.items() if err is None)
    assert rows["caption"][rows["key"].index("cmyk")] == "caption of cmyk"

    stats = json.loads((out / "_stats" / "part-bad-00000.json").read_text())
    assert stats["samples"] == len(samples) + 1
    assert stats["rows"] + stats["failures"] == stats["samples"]
    assert stats["rows"] == len(rows["key"]) and stats["failures"] == len(failures["key"])
    assert summary.failed == len(expected_failures)


def test_exif_rotated_jpeg_is_stored_upright(tmp_path, bad_shard, config_for):
    tar, samples = bad_shard
    run_embed([str(tar)], str(tmp_path / "out"), config_for(), progress=False)
    rows = pq.read_table(tmp_path / "out" / "embeddings").to_pydict()
    i = rows["key"].index("exif_rotated")
    assert (rows["width"][i], rows["height"][i]) == (64, 96)  # stored 96x64, orientation 6
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(samples["exif_rotated"][1]))).convert("RGB")
    assert rows["phash"][i] == phash(upright)


def test_odd_modes_become_8_bit_rgb_not_failures(photos):
    samples = bad_and_odd_samples(photos["astronaut"])
    for key in ("cmyk", "gray16", "palette", "rgba"):
        img = open_upright(samples[key][1], max_pixels=10**8).image
        assert img.mode == "RGB" and img.size == (96, 64), key
    gray = np.asarray(open_upright(samples["gray16"][1], 10**8).image)
    reference = np.asarray(photos["astronaut"].resize((96, 64)).convert("L"))
    assert np.abs(gray[..., 0].astype(int) - reference).max() <= 1  # scaled, not clipped to white


def test_alpha_is_composited_onto_the_background():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert np.asarray(open_upright(buf.getvalue(), 10**6).image).min() == 255
    assert np.asarray(open_upright(buf.getvalue(), 10**6, background=(0, 0, 0)).image).max() == 0


def test_huge_image_is_rejected_from_its_header():
    from conftest import huge_png_header

    with pytest.raises(SampleError) as err:
        open_upright(huge_png_header(12_000, 12_000), max_pixels=10**8)
    assert err.value.kind == "too_large" and "12000x12000" in str(err.value)
    with pytest.raises(SampleError) as err:  # past Pillow's own decompression-bomb cap
        open_upright(huge_png_header(200_000, 200_000), max_pixels=10**12)
    assert err.value.kind == "too_large"


def test_truncated_tar_records_the_unreadable_rest(tmp_path, photos, config_for):
    from imgindex.pipeline.demo_corpus import jpeg_bytes

    members = [(f"{i:03d}.jpg", jpeg_bytes(photos["coffee"])) for i in range(3)]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    cut = tmp_path / "cut-00000.tar"
    cut.write_bytes(whole[: int(len(whole) * 0.6)])
    run_embed([str(cut)], str(tmp_path / "out"), config_for(), progress=False)
    stats = json.loads((tmp_path / "out" / "_stats" / "part-cut-00000.json").read_text())
    failures = pq.read_table(tmp_path / "out" / "failures").to_pydict()
    assert "bad_shard" in failures["error"]
    assert stats["rows"] >= 1 and stats["rows"] + stats["failures"] == stats["samples"]


def test_phash_equals_imagehash_on_real_photos():
    for path in photo_files():
        img = Image.open(path).convert("RGB")
        ours = phash(img) & (2**64 - 1)
        assert f"{ours:016x}" == str(imagehash.phash(img)), path.name


def test_reduced_size_jpeg_decoding_is_opt_in_close_and_keeps_the_original_size(tmp_path, photos, config_for):
    from imgindex.pipeline.decode import build_preprocess
    from imgindex.pipeline.demo_corpus import jpeg_bytes
    from imgindex.pipeline.model import load_backbone

    big = jpeg_bytes(photos["astronaut"].resize((2048, 1536)), quality=92)
    exact = open_upright(big, 10**8)
    fast = open_upright(big, 10**8, draft_side=224)
    assert (exact.width, exact.height) == (fast.width, fast.height) == (2048, 1536)
    assert exact.image.size == (2048, 1536) and fast.image.size == (512, 384)
    preprocess = build_preprocess(load_backbone(config_for()).data_config)
    a, b = preprocess(exact.image).astype(int), preprocess(fast.image).astype(int)
    assert 0 < np.abs(a - b).mean() < 3  # not the exact pixels, but close

    write_tar(tmp_path / "big-00000.tar", [("big.jpg", big)])
    run_embed([str(tmp_path / "big-00000.tar")], str(tmp_path / "fast"), config_for(**{"decode.draft": True}),
              progress=False)
    manifest = json.loads((tmp_path / "fast" / "_manifest.json").read_text())
    assert manifest["decode"]["draft"] is True
    row = pq.read_table(tmp_path / "fast" / "embeddings").to_pylist()[0]
    assert (row["width"], row["height"]) == (2048, 1536)


def test_decode_threads_give_the_same_full_batches_in_sample_order(bad_shard, config_for):
    from dataclasses import replace

    from imgindex.pipeline.schedule import Machine, decide
    from imgindex.pipeline.shard_job import Worker
    from imgindex.pipeline.sources import plan_shards

    tar, samples = bad_shard
    config = config_for(**{"runtime.lanes": 1, "runtime.batch_size": 4})
    (shard,) = plan_shards([str(tar)], config.source)
    runs = []
    for threads in (1, 3):
        schedule = replace(decide(config.runtime, Machine(cores=threads, gpus=0)), threads=threads)
        assert schedule.decode == "threads"
        with Worker("unused-out", config, schedule) as worker:
            runs.append(list(worker._batches(shard)))
    tallies = [[part for part, _, _ in run] for run in runs]
    assert [t.failures for t in tallies[0]] == [t.failures for t in tallies[1]]
    assert sum(t.samples for t in tallies[0]) == sum(t.samples for t in tallies[1]) == len(samples) + 1
    batches = [[batch for _, batch, _ in run if batch is not None] for run in runs]
    assert [b.rows for b in batches[0]] == [b.rows for b in batches[1]]
    assert all(a.images.equal(b.images) for a, b in zip(*batches))
    assert sum(len(b.images) for b in batches[1]) == sum(t.samples - len(t.failures) for t in tallies[1])


@contextlib.contextmanager
def released_after(fifo, seconds=30):
    """Should the read deadline break, open the FIFO's other end after `seconds`, so that the
    test fails on its assertions instead of hanging the suite."""
    def release():
        with contextlib.suppress(OSError):  # ENXIO: nobody is reading it any more
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(seconds, release)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_read_that_never_returns_is_a_timeout_failure_not_a_hung_job(tmp_path, photos, config_for, workers):
    from imgindex.pipeline.demo_corpus import jpeg_bytes

    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes(photos["coffee"]))
    os.mkfifo(root / "b.jpg")  # opening it for reading blocks until a writer comes: none will
    (root / "c.jpg").write_bytes(jpeg_bytes(photos["rocket"]))
    config = config_for(**{"source.read_timeout_s": 1, "runtime.workers": workers})
    with released_after(root / "b.jpg"):
        summary = run_embed([str(root)], str(tmp_path / "out"), config, progress=False)
    assert summary.images == 2 and summary.failures_by_error == {"timeout": 1}
    failures = pq.read_table(tmp_path / "out" / "failures").to_pydict()
    assert failures["key"] == ["b.jpg"] and "no data after 1 s" in failures["message"][0]


def test_a_tar_that_never_opens_is_a_bad_shard_not_a_hung_job(tmp_path, config_for):
    os.mkfifo(tmp_path / "stuck-00000.tar")
    with released_after(tmp_path / "stuck-00000.tar"):
        summary = run_embed([str(tmp_path / "stuck-00000.tar")], str(tmp_path / "out"),
                            config_for(**{"source.read_timeout_s": 0.5}), progress=False)
    assert summary.shards_done == 1 and summary.failures_by_error == {"bad_shard": 1}
    failures = pq.read_table(tmp_path / "out" / "failures").to_pydict()
    assert "from the start: TimeoutError" in failures["message"][0]
