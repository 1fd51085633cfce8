"""Shared fixtures: a small random-init XCiT saved as a checkpoint file, real photos, and
helpers that write them (and broken samples) into real tar shards at test time."""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from imgindex.pipeline.config import load_config
from imgindex.pipeline.demo_corpus import jpeg_bytes, photo_files, write_tar

MODEL = "xcit_nano_12_p16_224.fb_in1k"
# Ray in the tests talks over loopback only: this switch makes every Ray process (nodes, drivers,
# actors) take 127.0.0.1 as its address. Ray reads it once, when it is imported, so it is set
# here, before any test imports Ray; the jobs the tests start inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Planted-neighbour vectors (synthetic.py) are a helper the tests share with the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A full xcit_nano model (classifier head included, as real checkpoints have) in safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(1234)
    model = timm.create_model(MODEL, pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "xcit_nano_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photos from scikit-image's wheel, as RGB images."""
    return {p.stem: Image.open(p).convert("RGB") for p in photo_files()}


@pytest.fixture
def config_for(checkpoint):
    """The test config with the test checkpoint, through the same --checkpoint path users use."""
    def make(**overrides):
        values = {"model.checkpoint": str(checkpoint)}
        values.update(overrides)
        return load_config("test", values)
    return make


def png_bytes(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **params)
    return buf.getvalue()


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims enormous dimensions, with almost no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(img: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def bad_and_odd_samples(photo: Image.Image) -> dict[str, tuple[str, bytes, str | None]]:
    """key -> (member extension, bytes, expected error class or None when it must embed)."""
    small = photo.resize((96, 64))
    good = jpeg_bytes(small)
    gray16 = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)
    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(small.size))
    return {
        "good": ("jpg", good, None),
        "truncated": ("jpg", good[: len(good) // 2], "truncated"),
        "zero_bytes": ("jpg", b"", "empty"),
        "random_bytes": ("jpg", np.random.default_rng(0).bytes(3000), "not_an_image"),
        "text_named_jpg": ("jpg", b"this is a text file, not a JPEG\n" * 20, "not_an_image"),
        "huge": ("png", huge_png_header(), "too_large"),
        "cmyk": ("jpg", _save(small.convert("CMYK"), "JPEG"), None),
        "gray16": ("png", png_bytes(gray16), None),
        "palette": ("png", png_bytes(small.convert("P", palette=Image.Palette.ADAPTIVE)), None),
        "rgba": ("png", png_bytes(rgba), None),
        "exif_rotated": ("jpg", exif_rotated_jpeg(small), None),
    }


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def photo_tars(tmp_path, photos):
    """Two webdataset-style shards of real photos (JPEG + caption + json), keys unique."""
    def make(count: int = 2, per_shard: int = 4) -> list[Path]:
        names = sorted(photos)
        paths = []
        for s in range(count):
            members = []
            for i in range(per_shard):
                name = names[(s * per_shard + i) % len(names)]
                key = f"{s:02d}{i:03d}"
                members += [(f"{key}.jpg", jpeg_bytes(photos[name])), (f"{key}.txt", name.encode())]
            paths.append(write_tar(tmp_path / f"shard-{s:05d}.tar", members))
        return paths
    return make
