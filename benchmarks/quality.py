"""Answer quality on real images, pretrained against random weights, one run.

    python benchmarks/quality.py [--fashion /usr/share/datasets/fashion-mnist] [--fashion-count 2000]
                                 [--results results.jsonl]

1. Planted copies: scikit-image's photos (motorcycle_right, half of a stereo pair, left out)
   and the four quarters of those whose quarters show different things (not the textures,
   text and star fields, whose quarters look alike), at most 320 pixels a side, each with four
   copies (half size, 80% centre crop, JPEG quality 50, mirror). Search: per transform, how
   often the original is the nearest indexed image to its copy (copies not indexed). Dedup: a
   corpus of the originals and one copy of each (the transforms in turn, as a corpus where
   one image in two has a copy); per transform, the planted pairs found by our phash tier
   (distance 4) and our embedding tier (threshold auto, and fixed 0.80 and 0.90), with the
   precision of all pairs found (right when both images come from the same original). The same folder through
   imagededup's hashing methods (PHash, DHash, WHash, AHash at their default distance 10;
   `pip install imagededup`), so the figures show what each tier catches that they miss.
2. Fashion-MNIST (Debian's dataset-fashion-mnist, 10 labelled classes of product photos):
   `fashion-count` test images through `imgindex embed`, `index` and search; precision@10 and
   mean average precision@10 of same-class neighbours.
Both with EfficientNet-Lite0's packaged ImageNet weights (`--config lite0`) and with the same
architecture at random init.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import append_result  # noqa: E402

TRANSFORMS = ("half", "crop", "q50", "mirror")
SCENES = {"astronaut", "coffee", "chelsea", "rocket", "camera", "motorcycle_left", "retina", "ihc"}
RANDOM_CONFIG = "base: lite0\nmodel:\n  weights_package: null\n  pretrained: false\n"


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def copies_of(img: Image.Image) -> dict[str, bytes]:
    w, h = img.size
    return {"half": jpeg(img.resize((w // 2, h // 2))),
            "crop": jpeg(img.crop((w // 10, h // 10, w - w // 10, h - h // 10))),
            "q50": jpeg(img, quality=50), "mirror": jpeg(ImageOps.mirror(img))}


def photo_corpus(root: Path) -> dict[str, tuple[str, str]]:
    """originals/ and copies/ under root; copy name -> (original name, transform)."""
    from imgindex.pipeline.demo_corpus import photo_files

    (root / "originals").mkdir(parents=True)
    (root / "copies").mkdir()
    planted = {}
    for path in photo_files():
        if path.stem == "motorcycle_right":
            continue
        photo = Image.open(path).convert("RGB")
        w, h = photo.size
        quarters = [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]
        crops = {"": photo, **({f"-q{i}": photo.crop(box) for i, box in enumerate(quarters)}
                               if path.stem in SCENES else {})}
        for suffix, img in crops.items():
            img = img.copy()
            img.thumbnail((320, 320))
            name = f"{path.stem}{suffix}.jpg"
            (root / "originals" / name).write_bytes(jpeg(img, quality=95))
            for kind, data in copies_of(img).items():
                copy = f"{path.stem}{suffix}.copy-{kind}.jpg"
                (root / "copies" / copy).write_bytes(data)
                planted[copy] = (name, kind)
    return planted


def cli(*args) -> None:
    from imgindex.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    if code:
        raise SystemExit(f"imgindex {' '.join(map(str, args))} failed with {code}")


def pair_scores(pairs: set[frozenset], planted: dict[str, tuple[str, str]], names: list[str]) -> dict:
    """Recall per transform of the planted original-copy pairs, and precision of all pairs."""
    family = {n: planted[n][0] if n in planted else n for n in names}
    out = {}
    for kind in TRANSFORMS:
        wanted = [frozenset((c, o)) for c, (o, k) in planted.items() if k == kind]
        out[f"recall_{kind}"] = round(sum(p in pairs for p in wanted) / len(wanted), 3) if wanted else None
    right = sum(len({family[x] for x in p}) == 1 for p in pairs)
    out["precision"] = round(right / len(pairs), 3) if pairs else None
    out["pairs"] = len(pairs)
    return out


def photos_run(work: Path, planted: dict, config: str, label: str, random: bool) -> dict:
    import pyarrow.parquet as pq

    from imgindex.open_index import open_searcher

    cli("embed", work / "originals", "--out", work / f"emb-{label}", "--config", config, "--no-progress")
    cli("index", work / f"emb-{label}", "--out", work / f"idx-{label}", "--no-progress")
    searcher = open_searcher(work / f"idx-{label}")
    copies = sorted(planted)
    hits = searcher.search_images([work / "copies" / c for c in copies], k=1)
    top1 = {kind: [] for kind in TRANSFORMS}
    for copy, found in zip(copies, hits):
        top1[planted[copy][1]].append(found[0].key == planted[copy][0])
    result = {f"top1_{k}": round(float(np.mean(v)), 3) for k, v in top1.items()}
    mixed = work / "mixed"
    if not mixed.exists():  # the originals and one copy each, the transforms in turn
        mixed.mkdir()
        for i, path in enumerate(sorted((work / "originals").iterdir())):
            os.link(path, mixed / path.name)
            copy = f"{path.stem}.copy-{TRANSFORMS[i % len(TRANSFORMS)]}.jpg"
            os.link(work / "copies" / copy, mixed / copy)
    names = os.listdir(mixed)
    in_mixed = {c: planted[c] for c in names if c in planted}
    cli("embed", mixed, "--out", work / f"emb-mixed-{label}", "--config", config, "--no-progress")
    cli("index", work / f"emb-mixed-{label}", "--out", work / f"idx-mixed-{label}", "--no-progress")
    runs = {"phash": ["--method", "phash"], "embedding_0.80": ["--method", "embedding", "--threshold", "0.8"],
            "embedding_0.90": ["--method", "embedding", "--threshold", "0.9"]}
    runs["embedding_auto"] = ["--method", "embedding"] if not random else None  # random weights are refused
    for name, flags in runs.items():
        if flags is None:
            continue
        extra = ["--allow-random-weights"] if random and name.startswith("embedding") else []
        out = work / f"dedup-{label}-{name}"
        cli("dedup", "--index", work / f"idx-mixed-{label}", "--out", out, "--no-progress", *flags, *extra)
        table = pq.read_table(out / "pairs.parquet").to_pylist()
        scores = pair_scores({frozenset((p["a_key"], p["b_key"])) for p in table}, in_mixed, names)
        summary = json.loads((out / "summary.json").read_text())
        if name == "embedding_auto":
            scores["threshold"] = summary.get("threshold")
        result[name] = scores
    return result


def imagededup_run(work: Path, planted: dict) -> dict:
    try:
        from imagededup import methods
    except ImportError:
        return {"skipped": "pip install imagededup"}
    names = os.listdir(work / "mixed")
    planted = {c: planted[c] for c in names if c in planted}
    out = {}
    for method in ("PHash", "DHash", "WHash", "AHash"):
        hasher = getattr(methods, method)(verbose=False)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            found = hasher.find_duplicates(image_dir=str(work / "mixed"), max_distance_threshold=10)
        pairs = {frozenset((a, b)) for a, dups in found.items() for b in dups}
        out[method] = pair_scores(pairs, planted, names)
    return out


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]  # IDX: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_run(folder: Path, count: int, work: Path, config: str, label: str) -> dict:
    from imgindex.indexes.query import Searcher

    images = read_idx(folder / "t10k-images-idx3-ubyte.gz")[:count]
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")[:count]
    pictures = work / "fashion"
    if not pictures.exists():
        pictures.mkdir()
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(pictures / f"{i:05d}.png")
    cli("embed", pictures, "--out", work / f"emb-fashion-{label}", "--config", config, "--no-progress")
    cli("index", work / f"emb-fashion-{label}", "--out", work / f"idx-fashion-{label}", "--no-progress")
    searcher = Searcher(work / f"idx-fashion-{label}")
    keys = [f"{i:05d}.png" for i in range(count)]
    results = searcher.search_keys(keys, k=11)
    precisions, aps = [], []
    for i, hits in enumerate(results):
        ranked = [int(h.key[:5]) for h in hits if h.key != keys[i]][:10]
        relevant = np.asarray([labels[j] == labels[i] for j in ranked], dtype=float)
        precisions.append(relevant.mean())
        cumulative = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
        aps.append(float((cumulative * relevant).sum() / max(1.0, relevant.sum())))
    return {"p_at_10": round(float(np.mean(precisions)), 3), "map_at_10": round(float(np.mean(aps)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--fashion-count", type=int, default=2000)
    parser.add_argument("--results", help="append the figures to this JSON-lines file")
    args = parser.parse_args()
    figures: dict = {"benchmark": "quality"}
    with tempfile.TemporaryDirectory(prefix="imgindex-quality-") as tmp:
        work = Path(tmp)
        random_config = work / "lite0-random.yaml"
        random_config.write_text(RANDOM_CONFIG)
        planted = photo_corpus(work)
        figures["originals"], figures["copies"] = len(os.listdir(work / "originals")), len(planted)
        for label, config in (("pretrained", "lite0"), ("random", str(random_config))):
            figures[label] = photos_run(work, planted, config, label, random=label == "random")
            print(label, json.dumps(figures[label]), flush=True)
        figures["imagededup"] = imagededup_run(work, planted)
        print("imagededup", json.dumps(figures["imagededup"]), flush=True)
        fashion = Path(args.fashion)
        if (fashion / "t10k-images-idx3-ubyte.gz").is_file():
            for label, config in (("pretrained", "lite0"), ("random", str(random_config))):
                figures[f"fashion_{label}"] = fashion_run(fashion, args.fashion_count, work, config, label)
                print(f"fashion {label}", json.dumps(figures[f"fashion_{label}"]), flush=True)
        else:
            figures["fashion"] = f"skipped: no {fashion} (apt-get install dataset-fashion-mnist)"
    print(json.dumps(figures, indent=1))
    append_result(args.results, figures)


if __name__ == "__main__":
    main()
