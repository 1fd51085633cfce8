"""Dedup on a folder of planted copies, through the command line: byte-identical files are
`exact` for every pair, the colour original is kept over its grayscale copy, the lists hold
plain paths that shell tools can use (spaces and newlines included), and the warnings and
report say what is true."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imgindex.indexes.build import build_index
from imgindex.pipeline.config import load_config
from imgindex.pipeline.demo_corpus import jpeg_bytes
from imgindex.pipeline.job import run_embed

COPIES = ["copy_1.jpg", "copy_2.jpg", "copy_3.jpg", "copy_4.jpg"]  # four files, the same bytes


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "imgindex", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def copies(tmp_path_factory, checkpoint, photos):
    root = tmp_path_factory.mktemp("copies")
    folder = root / "my photos"  # a space in the path
    folder.mkdir()
    astronaut = jpeg_bytes(photos["astronaut"].resize((128, 128)))
    for name in COPIES:
        (folder / name).write_bytes(astronaut)
    colour = photos["chelsea"].resize((120, 90))
    (folder / "b_colour_original.jpg").write_bytes(jpeg_bytes(colour, quality=95))
    (folder / "a_gray_copy.jpg").write_bytes(jpeg_bytes(colour.convert("L").convert("RGB").convert("L"), quality=95))
    coffee = jpeg_bytes(photos["coffee"].resize((100, 80)))
    (folder / "coffee.jpg").write_bytes(coffee)
    (folder / "line\nbreak.jpg").write_bytes(coffee)  # a newline in the key
    for name in ("rocket", "camera", "coins"):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photos[name].resize((96, 72))))
    config = load_config("test", {"model.checkpoint": str(checkpoint)})
    run_embed([str(folder)], str(root / "emb"), config, progress=False)
    build_index(str(root / "emb"), str(root / "idx"), progress=False)
    out = root / "dedup"
    result = run_cli("dedup", "--index", root / "idx", "--out", out, "--method", "exact,phash", "--no-progress")
    assert result.returncode == 0, result.stderr
    return root, folder, out, result


def test_every_pair_of_identical_files_is_exact(copies):
    _, _, out, result = copies
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    among = [p for p in pairs if p["a_key"] in COPIES and p["b_key"] in COPIES]
    assert len(among) == 6 and {p["kind"] for p in among} == {"exact"}
    assert {p["kind"] for p in pairs if {p["a_key"], p["b_key"]} == {"coffee.jpg", "line\nbreak.jpg"}} == {"exact"}
    exact = sum(p["kind"] == "exact" for p in pairs)
    assert f"({exact} exact," in result.stdout and exact == 7


def test_the_colour_original_is_kept_over_its_grayscale_copy(copies):
    _, _, out, _ = copies
    groups = pq.read_table(out / "groups.parquet").to_pylist()
    pair = {g["key"]: g for g in groups if g["key"] in ("a_gray_copy.jpg", "b_colour_original.jpg")}
    assert set(pair) == {"a_gray_copy.jpg", "b_colour_original.jpg"}
    assert pair["b_colour_original.jpg"]["keep"] and not pair["a_gray_copy.jpg"]["keep"]
    assert pair["b_colour_original.jpg"]["reason"].startswith("largest: 120x90 pixels, colour")
    assert "then colour over grayscale" in (copies[2] / "report.html").read_text()
    assert pair["a_gray_copy.jpg"]["kind"] == "phash" and pair["a_gray_copy.jpg"]["phash_distance"] <= 4


def test_lists_are_plain_paths_one_a_line_and_nul_separated(copies):
    _, folder, out, _ = copies
    lines = (out / "remove.txt").read_text().splitlines()
    unescaped = [line.replace("\\n", "\n").replace("\\\\", "\\") for line in lines]
    assert len(lines) == 3 + 1 + 1  # three copies, the gray copy, the newline file (or coffee)
    assert all(Path(p).is_file() and Path(p).parent == folder for p in unescaped)
    assert not any(line.startswith("file:") for line in lines)
    nul = (out / "remove.nul").read_bytes().split(b"\0")
    assert nul[-1] == b"" and sorted(p.decode() for p in nul[:-1]) == sorted(unescaped)
    keep = (out / "keep.txt").read_text().splitlines()
    assert len(keep) == 3 and all(Path(p.replace("\\n", "\n")).is_file() for p in keep)


def test_report_states_the_tiers_that_were_on_and_each_members_tie(copies):
    _, _, out, _ = copies
    html = (out / "report.html").read_text()
    assert "exact: identical bytes; phash: within 4 bits" in html
    assert "threshold" not in html and "cosine &gt;=" not in html
    assert "phash: " in html and "bits apart" in html
    assert "break-all" not in html


def test_no_false_capped_neighbours_warning_on_a_small_index(copies):
    root, _, _, _ = copies
    small = run_cli("dedup", "--index", root / "idx", "--dry-run", "--no-progress")
    assert small.returncode == 0, small.stderr
    assert "neighbours above the threshold" not in small.stderr  # random weights: all are, but 100 > images
    capped = run_cli("dedup", "--index", root / "idx", "--dry-run", "--no-progress", "--max-neighbors", "3")
    assert "have more than 3 neighbours above the threshold" in capped.stderr


def test_thumbnails_are_inlined_once_and_big_groups_are_cut(copies):
    from imgindex.indexes.dedup.review import dedup_report
    from imgindex.indexes.query import Searcher

    root, _, out, _ = copies
    groups = pq.read_table(out / "groups.parquet")
    sources = Searcher(root / "idx").sources()
    html = dedup_report(groups, sources, {"methods": ["exact"], "groups": 3}, limit=10, members_shown=2)
    assert html.count("data:image/jpeg;base64,") == 2 * 3  # two members of each of three groups
    assert "and 2 more" in html  # the four copies: two shown


def test_a_report_of_many_big_groups_stays_bounded():
    import pyarrow as pa

    from imgindex.indexes.dedup.groups import GROUP_SCHEMA
    from imgindex.indexes.dedup.review import GROUP_MEMBERS, PAGE_THUMBNAILS, REPORT_GROUPS, dedup_report

    rows = [{"shard": "s", "key": f"g{g}-m{m}", "group_id": g, "keep": m == 0, "reason": "largest" if m == 0 else
             f"duplicate of g{g}-m0", "group_size": 30, "min_similarity": 0.9, "similarity": 1.0 - m / 100,
             "kind": None if m == 0 else "embedding", "phash_distance": None}
            for g in range(10_000) for m in range(30)]
    html = dedup_report(pa.Table.from_pylist(rows, schema=GROUP_SCHEMA), {}, {"methods": ["embedding"],
                                                                              "threshold": 0.95}, REPORT_GROUPS)
    assert html.count("<figure") <= PAGE_THUMBNAILS and html.count("<figure") == (PAGE_THUMBNAILS // GROUP_MEMBERS) * 12
    assert f"Showing the {PAGE_THUMBNAILS // GROUP_MEMBERS} largest groups of 10000" in html
    assert html.count("and 18 more") == PAGE_THUMBNAILS // GROUP_MEMBERS
    assert len(html) < 2_000_000  # no previews here: the figures alone stay small
