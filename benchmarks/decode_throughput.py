"""Decode + preprocess throughput per core: the project's per-sample work vs a bare PIL + timm loop.

    python benchmarks/decode_throughput.py [--count 200] [--results results.jsonl]

For ImageNet-size (500x375) and large (2048x1536) JPEGs made from real photos, one process:
- bare: Image.open -> convert RGB -> timm eval transform (to a normalized float tensor);
- ours: what a decode worker does per sample: header checks, EXIF upright, sha256, phash,
  timm resize/crop to uint8 (normalization runs later, on the model's device);
- ours with reduced-size JPEG decoding (decode.draft: true).
Prints images/s and the ratios, the mean absolute pixel difference and phash bits of the fast path, and the
embedding cosine between fast and exact (random-init XCiT-Nano, or --checkpoint), raw and centered on
the images' mean vector (which random weights need to mean anything), beside the centered cosine of
two different images. The bare loop
computes no phash, so the phash's own cost is measured too, and ours is also set against the
bare loop plus that cost (what is left is the loader's own overhead).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import timm
import torch
from PIL import Image


from imgindex.pipeline.config import load_config  # noqa: E402
from imgindex.pipeline.decode import build_preprocess, open_upright, phash, sha256, stack_nchw  # noqa: E402
from imgindex.pipeline.demo_corpus import jpeg_bytes, photo_files  # noqa: E402
from imgindex.pipeline.model import load_backbone  # noqa: E402
from results import append_result  # noqa: E402

SIZES = {"imagenet_500x375": (500, 375), "large_2048x1536": (2048, 1536)}


def corpus(size: tuple[int, int], count: int) -> list[bytes]:
    photos = [Image.open(p).convert("RGB") for p in photo_files()]
    return [jpeg_bytes(photos[i % len(photos)].resize(size, Image.Resampling.BICUBIC), quality=90)
            for i in range(count)]


def rate(fn, items) -> float:
    fn(items[0])  # warm up
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def centered_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine after subtracting `a`'s mean vector. Random-init weights map every image
    to nearly the same direction (raw cosines above 0.999), so the raw cosine cannot tell a
    changed image from the same one; centered, different images fall far apart."""
    mean = a.mean(axis=0)
    a, b = a - mean, b - mean
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="images per size")
    parser.add_argument("--model", default="xcit_nano_12_p16_224.fb_in1k")
    parser.add_argument("--checkpoint", help="real weights for the cosine figure (default: random init)")
    parser.add_argument("--results", help="append a JSON line of the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_config("cpu", {"model.name": args.model, "model.checkpoint": args.checkpoint,
                                 "model.pretrained": False})
    backbone = load_backbone(config)
    data_config = backbone.data_config
    full = timm.data.create_transform(**data_config, is_training=False)
    preprocess = build_preprocess(data_config)
    side = int(max(data_config["input_size"][1:]) / data_config.get("crop_pct", 1.0))

    def bare(data: bytes):
        import io
        return full(Image.open(io.BytesIO(data)).convert("RGB"))

    def ours(data: bytes, draft: int | None = None):
        img = open_upright(data, config.decode.max_pixels, draft_side=draft).image
        sha256(data)
        phash(img)
        return preprocess(img)

    figures = {"benchmark": "decode_throughput", "model": args.model, "count": args.count,
               "machine": f"{platform.machine()}, 1 thread per process", "pillow": Image.__version__}
    for name, size in SIZES.items():
        items = corpus(size, args.count)
        bare_rate = rate(bare, items)
        ours_rate = rate(ours, items)
        fast_rate = rate(lambda d: ours(d, side), items)
        phash_ms = 1000 / rate(phash, [open_upright(d, config.decode.max_pixels).image for d in items])
        bare_plus_phash_rate = 1 / (1 / bare_rate + phash_ms / 1000)
        exact_px = np.stack([ours(d) for d in items[:32]])
        fast_px = np.stack([ours(d, side) for d in items[:32]])
        exact_vec = backbone.embed(stack_nchw(list(exact_px)))
        fast_vec = backbone.embed(stack_nchw(list(fast_px)))
        cosine = float(np.einsum("ij,ij->i", exact_vec, fast_vec).min())
        centered = centered_cosines(exact_vec, fast_vec)
        distinct = centered_cosines(exact_vec, np.roll(exact_vec, 1, axis=0))  # each photo beside the next one
        phash_bits = [bin((phash(open_upright(d, config.decode.max_pixels).image)
                           ^ phash(open_upright(d, config.decode.max_pixels, draft_side=side).image))
                          & (2**64 - 1)).count("1") for d in items[:32]]
        figures[name] = {
            "bare_images_per_s": round(bare_rate, 1), "ours_images_per_s": round(ours_rate, 1),
            "ours_draft_images_per_s": round(fast_rate, 1), "ours_vs_bare": round(ours_rate / bare_rate, 3),
            "draft_vs_bare": round(fast_rate / bare_rate, 3), "phash_ms_per_image": round(phash_ms, 3),
            "ours_vs_bare_plus_phash": round(ours_rate / bare_plus_phash_rate, 3),
            "draft_mean_abs_pixel_diff": round(float(np.abs(exact_px.astype(int) - fast_px.astype(int)).mean()), 3),
            "draft_min_cosine": round(cosine, 6), "draft_min_centered_cosine": round(float(centered.min()), 4),
            "distinct_images_mean_centered_cosine": round(float(distinct.mean()), 4),
            "draft_phash_max_bits": max(phash_bits),
            "draft_phash_mean_bits": round(float(np.mean(phash_bits)), 2),
        }
        f = figures[name]
        print(f"{name}: bare {f['bare_images_per_s']}/s, ours {f['ours_images_per_s']}/s "
              f"(ours/bare = {f['ours_vs_bare']}), ours+draft {f['ours_draft_images_per_s']}/s "
              f"(draft/bare = {f['draft_vs_bare']}); draft pixel diff {f['draft_mean_abs_pixel_diff']}, "
              f"min cosine fast vs exact {f['draft_min_cosine']} (centered on the images' mean: "
              f"{f['draft_min_centered_cosine']}; two different images: {f['distinct_images_mean_centered_cosine']}), "
              f"phash differs by {f['draft_phash_max_bits']} bits "
              f"at most (mean {f['draft_phash_mean_bits']}); the phash alone {f['phash_ms_per_image']} ms, "
              f"ours / (bare + phash) = {f['ours_vs_bare_plus_phash']}")
    if not args.checkpoint:
        print("note: random-init weights; the cosine figure is only indicative (pass --checkpoint)")
    print(json.dumps(figures))
    append_result(args.results, figures)


if __name__ == "__main__":
    main()
