"""Calibrate dedup thresholds on the user's own corpus by planting known copies.

A seeded sample of indexed images is read back from its sources; each gets transformed
copies (half size, 80% centre crop, JPEG quality 50, horizontal flip) that are embedded
with the model the index records. For each embedding threshold: recall = copies whose
cosine to their original reaches it; false matches = other indexed images that reach it
among each copy's 10 nearest neighbours; precision = recall hits / (hits + false matches).
The duplicates the corpus already holds are not false matches: an indexed image whose
perceptual hash is within 10 bits of the planted copy's, the original's or the original's
mirror image's (the same picture), or whose cosine to the original reaches that of one of the
original's planted copies (as close as what this calibration calls a copy). Duplicates further
than that still count as false, so precision is a lower bound. The phash tier gets the same treatment with Hamming
distances (false matches: every other indexed image within the distance, less those at
least as close to the original's hash as the copy's).
"""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from imgindex.indexes.dedup.corpus import hashes
from imgindex.indexes.dedup.tiers import hamming, phash_pairs
from imgindex.indexes.gallery import fetch_images
from imgindex.indexes.query import Searcher
from imgindex.errors import ConfigError, SampleError

THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
FINE_THRESHOLDS = tuple(round(t / 100, 2) for t in range(30, 100))  # what --threshold auto chooses from
DISTANCES = (0, 2, 4, 6, 8, 10, 12)
SAME_PICTURE_BITS = 10  # a perceptual hash this close to a planted copy's: the same picture, not a false match


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    return img.crop((w // 10, h // 10, w - w // 10, h - h // 10))


TRANSFORMS: dict[str, Callable[[Image.Image], bytes]] = {
    "resize_half": lambda img: _jpeg(img.resize((max(1, img.width // 2), max(1, img.height // 2)))),
    "crop_80": lambda img: _jpeg(_crop(img)),
    "jpeg_q50": lambda img: _jpeg(img, quality=50),
    "flip": lambda img: _jpeg(ImageOps.mirror(img)),
}


def calibrate(searcher: Searcher, sample: int = 100, seed: int = 0,
              thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """Recall and precision per threshold (embedding) and per distance (phash), by transform. The
    index's image model (the Searcher's `embedder()`) decodes, hashes and embeds the copies."""
    rows = np.sort(np.random.default_rng(seed).choice(searcher.index.ntotal,
                                                      min(sample, searcher.index.ntotal), replace=False))
    chosen = searcher.ids.take(rows).to_pylist()
    images = fetch_images(searcher.sources(), [(r["shard"], r["key"]) for r in chosen], searcher.member_ranges)
    embedder = searcher.embedder()
    originals, copies = [], []  # (row, phash, mirror image's phash) and (original index, transform, bytes)
    for row, ident in zip(rows, chosen):
        data = images.get((ident["shard"], ident["key"]))
        if data is None:
            continue
        try:
            img = embedder.picture(data)
        except SampleError:
            continue
        originals.append((int(row), embedder.phash(img), embedder.phash(ImageOps.mirror(img))))
        copies += [(len(originals) - 1, name, make(img)) for name, make in TRANSFORMS.items()]
    if not copies:
        raise ConfigError("no sampled image could be read back from its source: calibration needs the "
                          "original images where the embeddings recorded them")
    vectors = embedder.embed_pixels([embedder.pixels(data) for _, _, data in copies])
    origin_rows = np.asarray([originals[o][0] for o, _, _ in copies])
    scores, found = searcher.index.search(vectors, 10)
    stored = np.stack([_stored_vector(searcher, int(r)) for r, _, _ in originals])
    copy_of = np.asarray([o for o, _, _ in copies])
    to_original = np.einsum("ij,ij->i", vectors, stored[copy_of])
    names = np.asarray([name for _, name, _ in copies])
    copy_hashes = np.asarray([embedder.phash(embedder.picture(data)) for _, _, data in copies],
                             dtype=np.int64)  # each planted copy decoded and hashed once
    distances = hamming(copy_hashes, np.asarray([originals[o][1] for o, _, _ in copies], dtype=np.int64))
    corpus = _corpus_hashes(searcher)
    held = corpus[0][np.maximum(found, 0)].ravel()  # the stored phash of each copy's neighbours
    same_picture = np.zeros(found.size, bool)
    for picture in (copy_hashes, np.asarray([originals[o][1] for o in copy_of]),
                    np.asarray([originals[o][2] for o in copy_of])):  # the copy, its original, the mirror image
        same_picture |= hamming(np.repeat(picture.astype(np.int64), found.shape[1]), held) <= SAME_PICTURE_BITS
    same_picture = same_picture.reshape(found.shape) & corpus[1][np.maximum(found, 0)]
    # ... or as close to the original as one of its planted copies is: what this calibration calls a copy
    hardest = np.full(len(originals), np.inf)
    np.minimum.at(hardest, copy_of, to_original)
    near_scores, near_rows = searcher.index.search(stored, 64)
    near = [dict(zip(held.tolist(), sims.tolist())) for held, sims in zip(near_rows, near_scores)]
    as_close = np.asarray([[near[o].get(int(r), -2.0) >= hardest[o] for r in found[i]]
                           for i, o in enumerate(copy_of)], dtype=bool).reshape(found.shape)
    another_copy = same_picture | as_close

    embedding = []
    for t in thresholds:
        hits = to_original >= t
        false = int(((scores >= t) & (found != origin_rows[:, None]) & (found >= 0) & ~another_copy).sum())
        entry = {"threshold": t, "recall": round(float(hits.mean()), 4),
                 "precision": round(float(hits.sum() / max(1, hits.sum() + false)), 4), "false_matches": false}
        entry.update({f"recall_{n}": round(float(hits[names == n].mean()), 4) for n in TRANSFORMS})
        embedding.append(entry)
    q, row = phash_pairs(corpus, max(DISTANCES), queries=(copy_hashes, np.ones(len(copies), bool)))
    other = row != origin_rows[q]
    other_distance = hamming(copy_hashes[q[other]], corpus[0][row[other]])
    original_hashes = np.asarray([originals[o][1] for o in copy_of], dtype=np.int64)
    to_copy_original = hamming(original_hashes[q[other]], corpus[0][row[other]])
    other_distance = other_distance[to_copy_original > distances[q[other]]]  # nearer ones: copies it holds
    phash_rows = []
    for d in DISTANCES:
        hits = distances <= d
        false = int((other_distance <= d).sum())
        entry = {"distance": d, "recall": round(float(hits.mean()), 4),
                 "precision": round(float(hits.sum() / max(1, hits.sum() + false)), 4), "false_matches": false}
        entry.update({f"recall_{n}": round(float(hits[names == n].mean()), 4) for n in TRANSFORMS})
        phash_rows.append(entry)
    good = [e for e in embedding if e["precision"] >= 0.99]
    return {"images": len(originals), "copies": len(copies), "transforms": list(TRANSFORMS),
            "embedding": embedding, "phash": phash_rows,
            "suggested_threshold": good[0]["threshold"] if good else None,
            "model": searcher.manifest.embeddings.model.name,
            "weights": searcher.manifest.embeddings.weights_source}


def _corpus_hashes(searcher: Searcher) -> tuple[np.ndarray, np.ndarray]:
    """Every indexed image's stored phash, in index order: (values, valid)."""
    import pyarrow as pa

    columns = [searcher.embeddings_for(p.shard).read_columns(p.shard, ["phash"])["phash"]
               for p in searcher.manifest.parts]
    return hashes(pa.chunked_array([c for col in columns for c in col.chunks], type=pa.int64()))


def _stored_vector(searcher: Searcher, row: int) -> np.ndarray:
    ident = searcher.ids.slice(row, 1).to_pylist()[0]
    return searcher.embeddings_for(ident["shard"]).vector_of(ident["shard"], ident["key"])


def format_table(result: dict) -> str:
    names = result["transforms"]
    lines = [f"calibrated on {result['copies']} planted copies of {result['images']} images "
             f"({result['model']}, weights: {result['weights']})", "",
             "embedding tier:  threshold  recall  precision  false  " + "  ".join(names)]
    for e in result["embedding"]:
        lines.append(f"{'':17}{e['threshold']:9.2f}  {e['recall']:6.3f}  {e['precision']:9.3f}  "
                     f"{e['false_matches']:5d}  " + "  ".join(f"{e[f'recall_{n}']:{len(n)}.3f}" for n in names))
    lines += ["", "phash tier:      distance   recall  precision  false  " + "  ".join(names)]
    for e in result["phash"]:
        lines.append(f"{'':17}{e['distance']:8d}  {e['recall']:7.3f}  {e['precision']:9.3f}  {e['false_matches']:5d}  "
                     + "  ".join(f"{e[f'recall_{n}']:{len(n)}.3f}" for n in names))
    suggestion = result["suggested_threshold"]
    lines += ["", f"suggested --threshold: {suggestion} (lowest with precision >= 0.99)" if suggestion else
              "no threshold reached precision 0.99 on this sample"]
    if result["weights"] == "random":
        lines.append("WARNING: the index was made with random weights: the embedding figures mean nothing")
    return "\n".join(lines)


def choose_threshold(result: dict, target_precision: float) -> dict:
    """The lowest threshold whose planted-copy precision reaches the target (the most recall at
    that precision); when none does, the most precise one, said so. The entry, plus `met`."""
    rows = result["embedding"]
    met = [e for e in rows if e["precision"] >= target_precision]
    chosen = met[0] if met else max(rows, key=lambda e: (e["precision"], -e["threshold"]))
    return {**chosen, "met": bool(met), "target_precision": target_precision,
            "images": result["images"], "copies": result["copies"]}
