"""Encoded bytes -> upright RGB image -> model-ready uint8 pixels, sha256 and phash.

A sample that cannot become an image raises SampleError with a short class (`empty`,
`not_an_image`, `too_large`, `truncated`, `decode_error`) that ends up in the failures table.
The image is turned upright by its EXIF orientation; odd modes are converted, not failed:
CMYK, palette and 16-bit images become 8-bit RGB, and transparent pixels are composited
onto `alpha_background`.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import timm.data
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms as T

from imgindex.pipeline.config import DecodeConfig
from imgindex.errors import SampleError

DECODE_MODE = ("pil; exif_transpose; 16/32-bit integers scaled by the bits they use; float from [0,1] or "
               "min-max; transparency composited on background; convert RGB")

# File signatures of formats Pillow reads: bytes that start so are an image Pillow cannot
# handle (`unsupported`, e.g. a 12-bit JPEG), not random bytes (`not_an_image`).
SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"II*\x00": "TIFF",
              b"MM\x00*": "TIFF", b"BM": "BMP", b"RIFF": "WEBP"}
UNSUPPORTED_WORDS = ("cannot handle", "not supported", "unsupported", "not available", "unknown", "unimplemented")


class Upright(NamedTuple):
    image: Image.Image  # upright 8-bit RGB; smaller than the original when decoded in draft mode
    width: int  # of the upright original
    height: int


def open_upright(data: bytes | None, max_pixels: int, background: tuple[int, int, int] = (255, 255, 255),
                 draft_side: int | None = None) -> Upright:
    """Decode bytes into an upright 8-bit RGB image, or raise SampleError.

    The size is checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing. With `draft_side`, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8
    scale whose sides stay at least `draft_side` (libjpeg's DCT scaling: much faster for
    large photos, slightly different pixels). Whatever else a decoder raises (Pillow's DDS
    plugin raises NotImplementedError for pixel formats it lacks) is this sample's failure too,
    never its caller's crash.
    """
    try:
        return _open_upright(data, max_pixels, background, draft_side)
    except SampleError:
        raise
    except Exception as exc:
        kind = "unsupported" if isinstance(exc, NotImplementedError) else "decode_error"
        raise SampleError(kind, f"{type(exc).__name__}: {exc}") from None


def _open_upright(data: bytes | None, max_pixels: int, background: tuple[int, int, int],
                  draft_side: int | None) -> Upright:
    if not data:
        raise SampleError("empty", "zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise _unidentified(data) from None
        except Image.DecompressionBombError as exc:  # Pillow's own cap, 2 x Image.MAX_IMAGE_PIXELS
            raise SampleError("too_large", f"rejected by Pillow's decompression-bomb check: {exc}") from None
        width, height = img.size
        if width * height > max_pixels:
            raise SampleError("too_large", f"{width}x{height} pixels is over the limit of {max_pixels}")
        if width == 0 or height == 0:
            raise SampleError("decode_error", f"image has no pixels ({width}x{height})")
        if draft_side and img.format == "JPEG":
            img.draft(img.mode, (draft_side, draft_side))
        try:
            img.load()
        except OSError as exc:
            text = str(exc).lower()
            if "truncat" in text or "broken data stream" in text:
                kind = "truncated"
            else:
                kind = "unsupported" if any(w in text for w in UNSUPPORTED_WORDS) else "decode_error"
            raise SampleError(kind, f"{type(exc).__name__}: {exc}") from None
    upright = ImageOps.exif_transpose(img)
    if upright.size != img.size:  # rotated by 90 degrees: the original's sides swap too
        width, height = height, width
    return Upright(to_rgb(upright, background), width, height)


def _unidentified(data: bytes) -> SampleError:
    """Pillow could not open the bytes: an image in a form it cannot read, or not an image."""
    for signature, fmt in SIGNATURES.items():
        if data.startswith(signature) and fmt in Image.OPEN:
            factory = Image.OPEN[fmt][0]
            try:
                factory(io.BytesIO(data), "")
            except Exception as exc:  # the format plugin's own reason, e.g. "cannot handle 12-bit layers"
                return SampleError("unsupported", f"{fmt} that Pillow cannot read ({type(exc).__name__}: {exc})")
            return SampleError("unsupported", f"{fmt} that Pillow cannot read")
    return SampleError("not_an_image", f"not a recognised image format ({len(data)} bytes)")


def significant_bits(values: np.ndarray) -> int:
    """The bits a 16/32-bit integer image actually uses, never fewer than 8: 12-bit data in
    16-bit files (common in TIFF and medical images) is scaled by 12 bits, not shown near-black.
    (PNG's sBIT is not used: PNG data is already scaled to the full 16 bits.)"""
    return max(8, int(values.max()).bit_length() if values.size else 8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: high bit depths are scaled down by their significant bits,
    float images from [0, 1] (or their own range), alpha is composited."""
    transparency = img.info.get("transparency")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.clip(np.asarray(img, dtype=np.int64), 0, None)
        shift = significant_bits(pixels) - 8
        gray = Image.fromarray(np.clip(pixels >> shift, 0, 255).astype(np.uint8), "L")
        if isinstance(transparency, int):  # a tRNS gray value: those pixels are transparent
            alpha = Image.fromarray(np.where(pixels == transparency, 0, 255).astype(np.uint8), "L")
            gray = Image.merge("LA", (gray, alpha))
        img = gray
    elif img.mode == "F":
        pixels = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = (0.0, 1.0) if pixels.size and 0 <= pixels.min() and pixels.max() <= 1 else (
            float(pixels.min(initial=0)), float(pixels.max(initial=1)))
        scaled = (pixels - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(pixels)
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, tuple(background))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


_PHASH_SIZE = 32
_DCT_LOW = 2.0 * np.cos(
    np.pi * np.arange(8)[:, None] * (2 * np.arange(_PHASH_SIZE)[None, :] + 1) / (2 * _PHASH_SIZE)
)


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash as imagehash.phash defines it, as a signed int64.

    Grayscale, Lanczos to 32x32, 2-D DCT-II, top-left 8x8 compared with its median, bits
    row-major with the first bit most significant: the unsigned value's hex is
    str(imagehash.phash(img)). Only the 8 low-frequency DCT rows are computed.
    """
    pixels = np.asarray(img.convert("L").resize((_PHASH_SIZE, _PHASH_SIZE), Image.Resampling.LANCZOS),
                        dtype=np.float64)
    low = _DCT_LOW @ pixels @ _DCT_LOW.T
    bits = (low > np.median(low)).ravel()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return value - (1 << 64) if value >= (1 << 63) else value


def is_grayscale(pixels: np.ndarray) -> bool:
    """The model input (uint8 CHW) has equal channels, to JPEG rounding: a gray image."""
    wide = pixels.astype(np.int16)
    return bool(np.abs(wide[0] - wide[1]).max() <= 2 and np.abs(wide[1] - wide[2]).max() <= 2)


def is_near_constant(pixels: np.ndarray) -> bool:
    """The model input is (almost) one colour: embedded, but with no signal (counted in the stats)."""
    flat = pixels.reshape(len(pixels), -1)
    return bool((flat.max(axis=1).astype(np.int16) - flat.min(axis=1)).max() <= 4)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_preprocess(data_config: dict) -> Callable[[Image.Image], np.ndarray]:
    """timm's eval transform up to (not including) ToTensor+Normalize, returning uint8 CHW
    (transposed here, in the decode threads, rather than batch-wide on the model's thread).

    The float conversion and normalization run on the model's device (pipeline.model), with
    the same operations as timm's ToTensor and Normalize, so results match the model card's.
    """
    transform = timm.data.create_transform(**data_config, is_training=False)
    steps = list(transform.transforms)
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or "ToTensor" not in type(steps[-2]).__name__:
        raise ValueError(f"unexpected timm eval transform, cannot split it: {transform}")
    pil_steps = T.Compose(steps[:-2])

    def preprocess(img: Image.Image) -> np.ndarray:
        out = np.asarray(pil_steps(img), dtype=np.uint8)
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    return preprocess


def draft_side(decode: DecodeConfig, data_config: dict) -> int | None:
    """With decode.draft on: the shorter side the model's resize needs, so JPEGs can be decoded
    at reduced size without going below it."""
    if not decode.draft:
        return None
    return int(max(data_config["input_size"][1:]) / data_config.get("crop_pct", 1.0))


def stack_nchw(pixels: list[np.ndarray]) -> torch.Tensor:
    """uint8 CHW images of one size -> one contiguous uint8 NCHW batch."""
    return torch.from_numpy(np.stack(pixels))


def describe_preprocess(data_config: dict) -> list[str]:
    """The transform steps as text, for the manifest."""
    transform = timm.data.create_transform(**data_config, is_training=False)
    return [repr(step) for step in transform.transforms]
