"""Property-based fuzzing (Hypothesis, fixed seed, bounded examples): hostile tars, random bytes
under image names, and fuzzed values for every config key. The invariants: nothing escapes as
a traceback, every member is a row, a failures row or a counted skip, (shard, key) is unique,
keys are text, and nothing is written outside OUT."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgindex.errors import ConfigError
from imgindex.pipeline.config import RULES, load_config
from imgindex.pipeline.decode import SampleError, open_upright
from imgindex.pipeline.demo_corpus import jpeg_bytes
from imgindex.pipeline.sources import Shard, read_shard

# Pillow warns about the corrupt EXIF it finds in random bytes; the decoder's answer is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

JPEG = jpeg_bytes(Image.new("RGB", (40, 30), (200, 40, 90)))
NAMES = st.one_of(
    st.sampled_from(["a.jpg", "a.jpg", "b.png", ".hidden.jpg", "noext", "dir/", "dir/c.jpg", "café.jpg",
                     "caf\udce9.jpg", "line\nbreak.jpg", "sp ace.jpg", "__key__", "x.txt", "x.json", "x.jpg",
                     "trailing.jpg/", "../up.jpg", "./dot.jpg", "deep/er/d.JPG", "double..jpg"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12),
)
KINDS = st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                                  tarfile.FIFOTYPE, tarfile.CHRTYPE])
PAYLOADS = st.one_of(st.just(JPEG), st.just(JPEG[: len(JPEG) // 2]), st.just(b""), st.binary(max_size=600),
                     st.just(b"caption text"))
MEMBERS = st.lists(st.tuples(NAMES, KINDS, PAYLOADS), min_size=0, max_size=10)
DAMAGE = st.one_of(st.none(), st.tuples(st.just("overwrite"), st.integers(0, 40), st.integers(0, 255)),
                   st.tuples(st.just("truncate"), st.integers(0, 20000), st.just(0)))


def hostile_tar(members, damage) -> tuple[bytes, int]:
    """The tar's bytes and how many members it was written with."""
    buf = io.BytesIO()
    written = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            try:
                tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
                written += 1
            except (ValueError, UnicodeError):  # a name tar itself cannot store
                continue
    raw = bytearray(buf.getvalue())
    if damage and damage[0] == "overwrite" and len(raw) > 512:
        block = damage[1] % (len(raw) // 512)
        raw[block * 512:(block + 1) * 512] = bytes([damage[2]]) * 512
    elif damage and damage[0] == "truncate":
        raw = raw[: damage[1]]
    return bytes(raw), written


@FUZZ
@given(members=MEMBERS, damage=DAMAGE)
def test_hostile_tars_never_crash_the_reader_and_lose_nothing(tmp_path_factory, members, damage):
    data, written = hostile_tar(members, damage)
    path = tmp_path_factory.mktemp("tar") / "fuzz-00000.tar"
    path.write_bytes(data)
    samples = list(read_shard(Shard(name="fuzz-00000", kind="tar", url=str(path))))
    good = [s for s in samples if s.skipped is None and s.error is None]
    assert len({s.key for s in good}) == len(good)  # (shard, key) unique among rows
    for sample in samples:
        sample.key.encode("utf-8")  # every key is storable text
        sample.member.encode("utf-8")
    if damage is None:
        with tarfile.open(path, ignore_zeros=True) as tar:
            regular = [m for m in tar.getmembers() if m.isreg() and not m.name.startswith("__")]
            others = len(tar.getmembers()) - len(regular)
        assert sum(s.skipped is not None for s in samples) == others
        assert sum(s.skipped is None for s in samples) <= len(regular)
        assert not [s for s in samples if s.error and s.error[0] == "bad_shard"]
        assert others + len(regular) == written


@settings(derandomize=True, database=None, deadline=None, max_examples=15,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(shards=st.lists(st.tuples(MEMBERS, DAMAGE), min_size=1, max_size=3))
def test_hostile_tars_through_the_job(tmp_path_factory, checkpoint, shards):
    from imgindex.pipeline.job import run_embed

    root = tmp_path_factory.mktemp("job")
    inputs = root / "in"
    inputs.mkdir()
    tars = []
    for number, (members, damage) in enumerate(shards):
        tars.append(inputs / f"f-{number:05d}.tar")
        tars[-1].write_bytes(hostile_tar(members, damage)[0])
    before = {p for p in root.rglob("*")}
    config = load_config("test", {"model.checkpoint": str(checkpoint)})
    summary = run_embed([str(t) for t in tars], str(root / "out"), config, progress=False)
    assert summary.shards_done == len(tars)
    assert {p for p in root.rglob("*")} - before <= {p for p in (root / "out").rglob("*")} | {root / "out"}
    stats = [json.loads(p.read_text()) for p in (root / "out" / "_stats").glob("*.json")]
    assert len(stats) == len(tars) and all(s["rows"] + s["failures"] == s["samples"] for s in stats)
    if list((root / "out" / "embeddings").glob("*.parquet")):
        rows = pq.read_table(root / "out" / "embeddings", columns=["shard", "key"]).to_pylist()
        assert len({(r["shard"], r["key"]) for r in rows}) == len(rows)
        assert len(rows) == sum(s["rows"] for s in stats)


FAILURE_CLASSES = ("empty", "not_an_image", "unsupported", "truncated", "too_large", "decode_error")
SIGNATURES = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM", b"RIFF"]


@FUZZ
@given(prefix=st.sampled_from(SIGNATURES), body=st.binary(max_size=2000))
def test_random_bytes_are_a_failure_class_never_a_crash(prefix, body):
    try:
        open_upright(prefix + body, 10**7)
    except SampleError as exc:
        assert exc.kind in FAILURE_CLASSES


@FUZZ
@given(prefix=st.sampled_from(SIGNATURES[1:]), cut=st.integers(1, len(JPEG) - 1), flips=st.lists(
    st.tuples(st.integers(0, len(JPEG) - 1), st.integers(0, 255)), max_size=8))
def test_damaged_images_are_a_failure_class_never_a_crash(prefix, cut, flips):
    data = bytearray(JPEG)
    for offset, value in flips:
        data[offset] = value
    try:
        decoded = open_upright(bytes(data[:cut]), 10**7)
    except SampleError as exc:
        assert exc.kind in FAILURE_CLASSES
    else:  # what decodes is an upright 8-bit RGB picture within the pixel bound, ready for the model
        assert decoded.image.mode == "RGB" and 1 <= decoded.image.width * decoded.image.height <= 10**7


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                   st.text(max_size=10), st.lists(st.integers(-1000, 1000), max_size=4),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


# The config keys' contract, written out from the README's config reference, independent of the
# checks in pipeline/config.py (RULES): per key, values that must load and values that must be refused.
CONTRACT = {
    "model.name": (["xcit_nano_12_p16_224.fb_in1k"], ["", "  ", 3, None, True]),
    "model.pretrained": ([True, False], ["yes", 1, None]),
    "model.checkpoint": ([None, "w.safetensors"], ["", 5, True]),
    "model.weights_package": ([None, "some-weights-package"], ["", 1, False]),
    "model.normalize": ([True, False], ["true", 0]),
    "runtime.device": (["auto", "cpu", "cuda", "cuda:1", "mps"], ["gpu", "cuda:", "cuda:x", "CPU", "", 0, None]),
    "runtime.precision": (["auto", "fp32", "bf16", "fp16"], ["fp64", "", None, 16]),
    "runtime.batch_size": ([1, 65_536, "auto"], [0, -1, 65_537, 1.5, "8", True, None]),
    "runtime.workers": ([0, 1024, "auto"], [-1, 1025, 1.5, True, "4"]),
    "runtime.lanes": ([1, 1024, "auto"], [0, -1, 1025, True, None]),
    "runtime.compile": ([True, False], ["no", 0]),
    "decode.max_pixels": ([1, 10**8], [0, -5, 2.5, True, "big"]),
    "decode.alpha_background": ([[0, 0, 0], [255, 255, 255]],
                                [[256, 0, 0], [0, 0], [1, 2, 3, 4], "white", [-1, 0, 0], [True, 0, 0], [0.5, 0, 0]]),
    "decode.draft": ([True, False], [1, "yes"]),
    "source.folder_shard_size": ([1, 1000], [0, -1, 1.5, True]),
    "source.list_column": (["path"], ["", 3, None]),
    "source.image_column": ([None, "image"], ["", "  ", 3, True]),
    "source.read_timeout_s": ([None, 0.5, 60], [0, -1, True, "60"]),
    "source.max_file_bytes": ([1, 2**30], [0, -1, True, 1.5]),
    "seed": ([0, 2**63 - 1], [-1, 2**63, True, 1.5]),
}


def config_file(directory: Path, key: str, value) -> Path:
    *sections, name = key.split(".")
    nested = {name: value}
    for section in reversed(sections):
        nested = {section: nested}
    path = directory / "fuzz.yaml"
    path.write_text(yaml.safe_dump(nested))
    return path


def loaded_value(config, key: str):
    holder = config
    for part in key.split("."):
        holder = getattr(holder, part)
    return holder


def test_every_config_key_has_a_written_contract():
    assert sorted(CONTRACT) == sorted(RULES)


@pytest.mark.parametrize("key", sorted(CONTRACT))
def test_config_keys_take_what_their_contract_allows_and_refuse_the_rest(tmp_path, key):
    allowed, refused = CONTRACT[key]
    for value in allowed:
        loaded = loaded_value(load_config(str(config_file(tmp_path, key, value))), key)
        assert list(loaded) == value if isinstance(value, list) else loaded == value
    for value in refused:
        with pytest.raises(ConfigError) as caught:
            load_config(str(config_file(tmp_path, key, value)))
        assert key in str(caught.value) and "\n" not in str(caught.value), value


@FUZZ
@given(key=st.sampled_from(sorted(CONTRACT)), value=VALUES)
def test_fuzzed_config_values_load_unchanged_or_fail_in_one_line(tmp_path_factory, key, value):
    path = config_file(tmp_path_factory.mktemp("cfg"), key, value)
    try:
        config = load_config(str(path))
    except ConfigError as exc:
        assert "\n" not in str(exc) and key in str(exc)
        return
    loaded = loaded_value(config, key)
    assert (list(loaded) if isinstance(loaded, tuple) else loaded) == value  # taken as written, never coerced
    assert not any(type(bad) is type(value) and bad == value for bad in CONTRACT[key][1])


@pytest.mark.parametrize("text", [b"\xff\xfe\x00garbage", b"model: [unclosed", b"- a list\n- of items\n",
                                  b"runtime: {batch_size: 1e999}", b"\x00\x01\x02"])
def test_broken_config_files_fail_in_one_line(tmp_path, text):
    path = Path(tmp_path / "broken.yaml")
    path.write_bytes(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert "\n" not in str(caught.value)
