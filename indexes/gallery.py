"""Self-contained HTML pages of thumbnails: no server, no scripts, no external assets.

Each distinct image is inlined once per page (a CSS class holding its data: URI), however
many times the page shows it, so a report stays small when the same images recur.
"""
from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable, Iterable

from PIL import Image, ImageOps

from imgindex.formats.names import printable
from imgindex.formats.records import ShardStats
from imgindex.formats.samples import KINDS, read_images

THUMB = 160


def thumbnail_uri(data: bytes | None, size: int = THUMB) -> str | None:
    """A small upright JPEG of the image as a data: URI, or None when it cannot be decoded."""
    jpeg = thumbnail_jpeg(data, size)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() if jpeg else None


def thumbnail_jpeg(data: bytes | None, size: int = THUMB) -> bytes | None:
    """A small upright JPEG of the image, or None when it cannot be decoded."""
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
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def fetch_images(sources: dict[str, ShardStats], wanted: Iterable[tuple[str, str]],
                 ranges: Callable[[str, list[str]], dict[str, tuple[int, int]]] | None = None,
                 ) -> dict[tuple[str, str], bytes]:
    """(shard, key) -> encoded bytes, read back from the shards' sources (one pass per shard);
    `ranges(shard, keys)` gives the tar members' (offset, size) where the parts record them, so
    each is read by its byte range instead of reading the tar; Parquet rows are read from their
    row groups, by the layout their shard's stats record."""
    by_shard: dict[str, list[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, []).append(key)
    found = {}
    for shard, keys in by_shard.items():
        stats = sources.get(shard)
        if stats is None or stats.kind not in KINDS:
            continue
        where = ranges(shard, keys) if ranges and stats.kind == "tar" else None
        for key, data in read_images(stats.kind, stats.source, keys, where, stats.parquet).items():
            found[(shard, key)] = data
    return found


def escape(text: str) -> str:
    """Text as HTML: markup escaped, and a name that is not UTF-8 shown with its bytes as `\\xNN`
    (a page must be UTF-8 whatever the corpus's names are)."""
    return html.escape(printable(text))


def breakable(text: str) -> str:
    """Escaped text that wraps after path and name separators (/ _ -) rather than mid-word."""
    return "".join(escape(piece) + ("<wbr>" if piece in "/_-" else "") for piece in re.split(r"([/_-])", text) if piece)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { font-size: 1.05em; margin: 1.5em 0 .4em; }
.row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; width: 170px; font-size: .8em; overflow-wrap: anywhere; }
.th { width: 160px; height: 160px; background: #eee center / contain no-repeat; border: 3px solid transparent;
  display: flex; align-items: center; justify-content: center; color: #777; }
figure.query .th { border-color: #2a6; }
figure.keep .th { border-color: #26c; }
figcaption b { display: block; }
.more { align-self: center; color: #555; }
.note { background: #fff4d6; padding: .5em .8em; }
"""


class Page:
    """One HTML page: sections of figures, each distinct thumbnail stored once."""

    def __init__(self, title: str):
        self.title = title
        self.sections: list[tuple[str, list[str]]] = []
        self.notes: list[str] = []
        self._classes: dict[object, str] = {}
        self._rules: list[str] = []
        self.missing = 0  # figures shown without a preview

    def thumbnail(self, ident: object, data: bytes | None) -> str:
        """The thumbnail box for image `ident` (its bytes decoded once, on first use)."""
        if ident not in self._classes:
            uri = thumbnail_uri(data)
            name = f"t{len(self._classes)}" if uri else ""
            if uri:
                self._rules.append(f'.{name} {{ background-image: url("{uri}"); }}')
            self._classes[ident] = name
        name = self._classes[ident]
        if not name:
            self.missing += 1
            return '<div class="th">no preview</div>'
        return f'<div class="th {name}" role="img"></div>'

    def figure(self, ident: object, data: bytes | None, title: str, lines: list[str], css: str = "") -> str:
        text = "".join(f"<div>{breakable(str(line))}</div>" for line in lines if line)
        return (f'<figure class="{css}">{self.thumbnail(ident, data)}<figcaption><b>{breakable(title)}</b>'
                f"{text}</figcaption></figure>")

    def section(self, heading: str, figures: list[str], hidden: int = 0) -> None:
        """`hidden`: members left out of this section, said at its end."""
        if hidden:
            figures = [*figures, f'<div class="more">and {hidden} more (all are in the Parquet tables)</div>']
        self.sections.append((heading, figures))

    def render(self, intro: str = "") -> str:
        notes = list(self.notes)
        if self.missing:
            notes.append(f"{self.missing} images show no preview: their source (tar, folder, list or Parquet file) "
                         "could not be read back here, or they could not be decoded. Previews are read from where the "
                         "images were embedded from.")
        body = "".join(f'<h2>{escape(heading)}</h2><div class="row">{"".join(figs)}</div>'
                       for heading, figs in self.sections)
        note_html = "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(self.title)}</title>"
                f"<style>{STYLE}{''.join(self._rules)}</style></head><body><h1>{escape(self.title)}</h1>"
                f"<p>{escape(intro)}</p>{note_html}{body}</body></html>")
