"""Self-contained HTML pages of thumbnails (inline data URIs: opens in any browser, no server)."""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable

from PIL import Image, ImageOps

THUMB = 160


def thumbnail_uri(data: bytes | None, size: int = THUMB) -> str | None:
    """A small upright JPEG of the image as a data: URI, or None when it cannot be decoded."""
    if not data:
        return None
    try:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        img.draft("RGB", (size * 2, size * 2))
        img = img.convert("RGB")
        img.thumbnail((size, size))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def fetch_images(sources: dict[str, dict], wanted: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """(shard, key) -> encoded bytes, read back from the shards' sources (one pass per shard)."""
    from imgindex.pipeline.sources import read_images

    by_shard: dict[str, list[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, []).append(key)
    found = {}
    for shard, keys in by_shard.items():
        stats = sources.get(shard) or {}
        if stats.get("kind") not in ("tar", "folder", "list"):
            continue
        for key, data in read_images(stats["kind"], stats["source"], keys).items():
            found[(shard, key)] = data
    return found


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { font-size: 1.05em; margin: 1.5em 0 .4em; }
.row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; width: 170px; font-size: .8em; word-break: break-all; }
figure img, figure .missing { width: 160px; height: 160px; object-fit: contain; background: #eee;
  border: 3px solid transparent; display: flex; align-items: center; justify-content: center; }
figure.query img { border-color: #2a6; }
figure.keep img { border-color: #26c; }
figcaption b { display: block; }
"""


def figure(uri: str | None, title: str, lines: list[str], css: str = "") -> str:
    image = f'<img src="{uri}" alt="{html.escape(title)}">' if uri else '<div class="missing">no preview</div>'
    text = "".join(f"<div>{html.escape(str(line))}</div>" for line in lines if line)
    return f'<figure class="{css}">{image}<figcaption><b>{html.escape(title)}</b>{text}</figcaption></figure>'


def page(title: str, sections: list[tuple[str, list[str]]], intro: str = "") -> str:
    """sections: (heading, figures' HTML)."""
    body = "".join(f'<h2>{html.escape(heading)}</h2><div class="row">{"".join(figs)}</div>'
                   for heading, figs in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(intro)}</p>{body}</body></html>")
