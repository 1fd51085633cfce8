"""A small corpus of real photos for the demo: the photos scikit-image ships in its wheel,
written as two WebDataset tar shards, with a few planted copies and one broken file.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image, ImageOps

from imgindex.errors import ConfigError, install_hint

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png",
          "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "moon.png", "coins.png", "brick.png", "grass.png",
          "gravel.png", "page.png", "text.png", "logo.png", "color.png", "cell.png")


def photo_files() -> list[Path]:
    """The real photos shipped inside scikit-image's wheel (no download needed)."""
    try:
        import skimage.data
    except ImportError:
        raise ConfigError(f"the demo corpus needs scikit-image: {install_hint('demo')}") from None
    folder = Path(skimage.data.__file__).parent
    found = [folder / name for name in PHOTOS if (folder / name).is_file()]
    if not found:
        raise ConfigError(f"no sample photos found in {folder}: reinstall scikit-image")
    return found


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write members (name, bytes) in order, as webdataset's TarWriter lays them out."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, jpeg: bytes, caption: str) -> list[tuple[str, bytes]]:
    meta = json.dumps({"key": key, "caption": caption}).encode()
    return [(f"{key}.jpg", jpeg), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)]


def write_demo_corpus(folder: Path) -> list[Path]:
    """Two tar shards of real photos as JPEG; shard 1 adds an exact copy, a re-encoded copy, a
    half-size copy and a centre crop of one photo, a mirror image of another, and one truncated
    JPEG (to show failures being recorded)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = photo_files()
    images = {p.stem: Image.open(p) for p in photos}
    encoded = {name: jpeg_bytes(img) for name, img in images.items()}
    names = sorted(encoded)
    half = len(names) // 2
    first, second = [], []
    for name in names[:half]:
        first += _sample(name, encoded[name], f"scikit-image sample photo {name}")
    for name in names[half:]:
        second += _sample(name, encoded[name], f"scikit-image sample photo {name}")
    original = names[0]
    img = images[original].convert("RGB")
    second += _sample(f"{original}_exact_copy", encoded[original], f"exact copy of {original}")
    second += _sample(f"{original}_reencoded", jpeg_bytes(img, quality=60), f"{original} saved at JPEG quality 60")
    second += _sample(f"{original}_half_size", jpeg_bytes(img.resize((img.width // 2, img.height // 2))),
                      f"{original} at half size")
    w, h = img.size  # copies only the embedding tier catches: a crop and a mirror image
    second += _sample(f"{original}_cropped", jpeg_bytes(img.crop((w // 20, h // 20, w - w // 20, h - h // 20))),
                      f"{original}, the centre 90%")
    mirrored = "coffee" if "coffee" in images else names[-1]
    second += _sample(f"{mirrored}_mirrored", jpeg_bytes(ImageOps.mirror(images[mirrored].convert("RGB"))),
                      f"{mirrored} mirrored left to right")
    second += _sample("broken_download", encoded[names[1]][: len(encoded[names[1]]) // 3], "a truncated JPEG")
    return [write_tar(folder / "demo-00000.tar", first), write_tar(folder / "demo-00001.tar", second)]
