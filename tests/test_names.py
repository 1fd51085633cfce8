"""Every name is its own key or a reversible escape of it: two files never share a key, and every
location written anywhere (remove lists, thumbnails, search paths) names the file's real bytes.
Checked as a property of the escape, and end to end through embed, index and dedup's lists with
generated names full of backslashes and bytes that are not UTF-8."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from imgindex.cli import main
from imgindex.pipeline.demo_corpus import jpeg_bytes
from imgindex.formats.names import raw_name, text_key
from imgindex.formats.samples import read_images, sample_location

# Names as a POSIX file system holds them: any bytes but "/" and NUL, decoded as Python does.
NAME_BYTES = st.lists(st.sampled_from([b"a", b"x", b"e", b"9", b"8", b"f", b"\\", b"\\x", b"\\\\", b"\xe9",
                                       b"\xff", b"\x80", "é".encode(), b" ", b"\n", b"."]),
                      min_size=1, max_size=8).map(b"".join)


@settings(derandomize=True, database=None, max_examples=500)
@given(st.lists(NAME_BYTES, min_size=2, max_size=6, unique=True))
def test_keys_are_unique_and_give_back_the_exact_name(names):
    decoded = [os.fsdecode(n) for n in names]
    keys = [text_key(n)[0] for n in decoded]
    assert len(set(keys)) == len(keys)
    for name, key in zip(names, keys):
        key.encode("utf-8")  # keys are always valid text
        assert os.fsencode(raw_name(key)) == name
        assert text_key(os.fsdecode(name))[1] in (None, name)


def test_a_literal_backslash_name_is_never_taken_for_a_latin1_one(tmp_path, photos, checkpoint):
    """`lit\\xe9.jpg` (a backslash in a UTF-8 name), its byte copy, and an unrelated Latin-1
    `lit<E9>.jpg`: the remove list names one of the copies, never the unique Latin-1 image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    copy = jpeg_bytes(photos["astronaut"].resize((96, 96)))
    unique = jpeg_bytes(photos["coffee"].resize((96, 72)))
    (folder / "lit\\xe9.jpg").write_bytes(copy)
    (folder / "copy.jpg").write_bytes(copy)
    (folder / os.fsdecode(b"lit\xe9.jpg")).write_bytes(unique)
    emb, idx, out = tmp_path / "emb", tmp_path / "idx", tmp_path / "dedup"
    assert main(["embed", str(folder), "--out", str(emb), "--config", "test", "--checkpoint", str(checkpoint),
                 "--no-progress"]) == 0
    assert not list((emb / "failures").glob("*.parquet"))  # no duplicate_key: three names, three keys
    assert len(pq.read_table(emb / "embeddings")) == 3
    assert main(["index", str(emb), "--out", str(idx), "--no-progress"]) == 0
    assert main(["dedup", "--index", str(idx), "--out", str(out), "--method", "exact", "--no-progress"]) == 0
    removed = [Path(os.fsdecode(p)) for p in (out / "remove.nul").read_bytes().split(b"\0")[:-1]]
    kept = [Path(os.fsdecode(p)) for p in (out / "keep.nul").read_bytes().split(b"\0")[:-1]]
    assert len(removed) == 1 and len(kept) == 1
    assert {removed[0].name, kept[0].name} == {"lit\\xe9.jpg", "copy.jpg"}
    assert removed[0].read_bytes() == copy
    source = f"file://{folder}"
    key = text_key("lit\\xe9.jpg")[0]
    assert read_images("folder", source, [key]) == {key: copy}  # the thumbnail shows this file
    assert Path(sample_location("folder", source, key)).read_bytes() == copy


def test_generated_names_reach_dedup_lists_as_their_own_bytes(tmp_path, photos, checkpoint):
    """Generated names (backslashes, `\\xNN` look-alikes, Latin-1 bytes, newlines), half of them
    byte copies of another: every listed location is a real file, every removed file has the
    same bytes as a kept one, and no unique image is ever listed for removal."""
    rng = random.Random(19)
    pieces = [b"a", b"\\", b"\\x", b"e9", b"\xe9", b"\\\\", b"\xff", b"\n", b" ", "é".encode(), b"x8"]
    names: set[bytes] = set()
    while len(names) < 16:
        name = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 5))) + b".jpg"
        names.add(name)
        if b"\xe9" in name:  # and its look-alike, which a one-way escape would confuse with it
            names.add(name.replace(b"\xe9", b"\\xe9"))
    folder = tmp_path / "fuzzed"
    folder.mkdir()
    sources = sorted(photos)
    originals: dict[bytes, bytes] = {}
    for i, name in enumerate(sorted(names)):
        if i % 2 and originals:  # a byte copy of an earlier file
            data = originals[sorted(originals)[rng.randrange(len(originals))]]
        else:
            data = jpeg_bytes(photos[sources[i % len(sources)]].resize((80, 64)).rotate(17 * i))
        (folder / os.fsdecode(name)).write_bytes(data)
        originals[name] = data
    emb, idx, out = tmp_path / "emb", tmp_path / "idx", tmp_path / "dedup"
    assert main(["embed", str(folder), "--out", str(emb), "--config", "test", "--checkpoint", str(checkpoint),
                 "--no-progress"]) == 0
    assert len(pq.read_table(emb / "embeddings")) == len(names)
    assert main(["index", str(emb), "--out", str(idx), "--no-progress"]) == 0
    assert main(["dedup", "--index", str(idx), "--out", str(out), "--method", "exact", "--no-progress"]) == 0
    removed = (out / "remove.nul").read_bytes().split(b"\0")[:-1]
    kept = (out / "keep.nul").read_bytes().split(b"\0")[:-1]
    assert removed and kept
    kept_bytes = {Path(os.fsdecode(p)).read_bytes() for p in kept}
    contents = list(originals.values())
    for path in removed:
        data = Path(os.fsdecode(path)).read_bytes()  # a real file, named by its own bytes
        assert data in kept_bytes and contents.count(data) > 1
    unique = {name for name, data in originals.items() if contents.count(data) == 1}
    assert not unique & {Path(os.fsdecode(p)).name.encode("utf-8", "surrogateescape") for p in removed}
    lines = (out / "remove.txt").read_bytes().split(b"\n")[:-1]
    assert len(lines) == len(removed)
