"""Dedup results on disk, for tools and for people: pairs.parquet, groups.parquet, keep.txt and
remove.txt (or leaks.txt) with NUL-separated twins, and a self-contained report.html.

Nothing here deletes or moves an image: the lists are for other tools to act on.

The .txt lists hold one location a line: a plain path for local files, `TAR#KEY` for tar
members, `FILE.parquet#KEY` for rows of Parquet files holding images (formats.samples says how
to find the row), a URL for remote objects. So that one line is always one location, a backslash in
a location is written `\\\\`, a newline `\\n` and a carriage return `\\r`. The .nul lists hold the
same locations unescaped, each ended by a NUL byte (for `xargs -0`). Names that are not
UTF-8 come back as their original bytes in both.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.indexes.dedup.find import DedupResult
from imgindex.indexes.gallery import Page, fetch_images
from imgindex.indexes.dedup.groups import KEEP_RULES
from imgindex.indexes.query import Searcher
from imgindex.plurals import counted
from imgindex.formats.records import ShardStats
from imgindex.formats.samples import sample_location

REPORT_GROUPS = 200  # groups shown in a report, largest first; all are in groups.parquet
GROUP_MEMBERS = 12  # members shown per group, the kept one first; the rest are counted
# Thumbnails a page inlines at most: photos' 160-pixel JPEG thumbnails average 5.6 KB (7.5 KB in
# base64), so a page stays near 11 MB, and under 20 MB for detailed images, however many groups.
PAGE_THUMBNAILS = 1500


def _paths(sources: dict[str, ShardStats], shards: list[str], keys: list[str]) -> list[str]:
    """Where each image lives (file path, TAR#KEY, FILE.parquet#KEY or URL); shard/key when the source is unknown."""
    out = []
    for shard, key in zip(shards, keys):
        stats = sources.get(shard)
        out.append((sample_location(stats.kind, stats.source, key) if stats else None) or f"{shard}/{key}")
    return out


def escape_line(location: str) -> str:
    return location.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def write_lists(out: Path, name: str, locations: list[str]) -> list[Path]:
    """NAME.txt (one escaped location a line) and NAME.nul (NUL-ended, unescaped)."""
    text, nul = out / f"{name}.txt", out / f"{name}.nul"
    text.write_bytes("".join(f"{escape_line(p)}\n" for p in locations).encode("utf-8", "surrogateescape"))
    nul.write_bytes("".join(f"{p}\0" for p in locations).encode("utf-8", "surrogateescape"))
    return [text, nul]


def tiers_text(stats: dict) -> str:
    """The tiers that were on, as the report states them."""
    parts = []
    for method in stats.get("methods", []):
        if method == "exact":
            parts.append("exact: identical bytes")
        elif method == "phash":
            parts.append(f"phash: within {stats.get('phash_distance')} bits")
        elif method == "embedding":
            parts.append(f"embedding: cosine >= {stats.get('threshold')}")
    return "; ".join(parts)


def link_text(kind: str | None, similarity: float, distance: int | None) -> str:
    """How a member (or a match) is tied to its kept image: the tier, and its measure."""
    if kind == "exact":
        return "exact: identical bytes"
    if kind == "phash":
        return f"phash: {distance} bits apart (cosine {similarity:.4f})"
    return f"embedding: cosine {similarity:.4f}" + (f", phash {distance} bits" if distance is not None else "")


def write_dedup(result: DedupResult, searcher: Searcher, out: Path, report_groups: int = REPORT_GROUPS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.pairs, out / "pairs.parquet")
    pq.write_table(result.groups, out / "groups.parquet")
    sources = searcher.sources()
    groups = result.groups.to_pydict()
    paths = _paths(sources, groups["shard"], groups["key"])
    lists = write_lists(out, "keep", [p for p, keep in zip(paths, groups["keep"]) if keep])
    lists += write_lists(out, "remove", [p for p, keep in zip(paths, groups["keep"]) if not keep])
    (out / "summary.json").write_text(json.dumps(result.stats, indent=2))
    (out / "report.html").write_text(dedup_report(result.groups, sources, result.stats, report_groups,
                                                  ranges=searcher.member_ranges))
    return [out / "pairs.parquet", out / "groups.parquet", *lists, out / "report.html"]


def dedup_report(groups: pa.Table, sources: dict[str, ShardStats], stats: dict, limit: int,
                 members_shown: int = GROUP_MEMBERS,
                 ranges: Callable[[str, list[str]], dict[str, tuple[int, int]]] | None = None) -> str:
    """Groups largest first, thumbnails side by side (the kept one first), each member's tie to it."""
    by_group: dict[int, list[dict]] = {}
    for row in groups.to_pylist():
        by_group.setdefault(row["group_id"], []).append(row)
    ordered = sorted(by_group.values(), key=lambda members: (-len(members), members[0]["group_id"]))
    shown, thumbnails = [], 0
    for members in ordered[:limit]:
        members = sorted(members, key=lambda m: (not m["keep"], -m["similarity"]))[:members_shown]
        if thumbnails + len(members) > PAGE_THUMBNAILS:
            break
        shown.append(members)
        thumbnails += len(members)
    images = fetch_images(sources, {(m["shard"], m["key"]) for members in shown for m in members}, ranges)
    page = Page("imgindex duplicates")
    for members in shown:
        figs = []
        for m in members:
            ident = (m["shard"], m["key"])
            tie = m["reason"] if m["keep"] else link_text(m["kind"], m["similarity"], m["phash_distance"])
            (where,) = _paths(sources, [m["shard"]], [m["key"]])  # the file a remove list would name
            figs.append(page.figure(ident, images.get(ident), ("KEEP  " if m["keep"] else "") + m["key"],
                                    [where, tie], css="keep" if m["keep"] else ""))
        first = members[0]
        page.section(f"group {first['group_id']}: {first['group_size']} images, lowest cosine between two members "
                     f"{first['min_similarity']:.4f}", figs, hidden=first["group_size"] - len(members))
    intro = (f"{counted(stats.get('groups', len(by_group)), 'group')}, "
             f"{counted(stats.get('removed', 0), 'image')} to remove. "
             f"Tiers: {tiers_text(stats)}; keep policy: {KEEP_RULES.get(stats.get('keep'), stats.get('keep'))}. "
             "The kept image of each group is framed in blue.")
    if len(ordered) > len(shown):
        intro += f" Showing the {len(shown)} largest groups of {len(ordered)}; all are in groups.parquet."
    return page.render(intro)


def write_leaks(result: DedupResult, searcher: Searcher, against_sources: dict[str, ShardStats], out: Path,
                report_groups: int = REPORT_GROUPS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.pairs, out / "pairs.parquet")
    pairs = result.pairs.to_pydict()
    leaked = list(dict.fromkeys(zip(pairs["a_shard"], pairs["a_key"])))
    lists = write_lists(out, "leaks", _paths(against_sources, [s for s, _ in leaked], [k for _, k in leaked]))
    (out / "summary.json").write_text(json.dumps(result.stats, indent=2))
    matches: dict[tuple[str, str], list[int]] = {}
    for i, a in enumerate(zip(pairs["a_shard"], pairs["a_key"])):
        matches.setdefault(a, []).append(i)
    shown = leaked[:report_groups]
    for a in shown:  # the closest matches first
        matches[a].sort(key=lambda i: -pairs["similarity"][i])
    test_images = fetch_images(against_sources, shown)
    train_images = fetch_images(searcher.sources(), {(pairs["b_shard"][i], pairs["b_key"][i])
                                                     for a in shown for i in matches[a][:GROUP_MEMBERS]},
                                searcher.member_ranges)
    page = Page("imgindex leakage check")
    for a in shown:
        figs = [page.figure(("test", *a), test_images.get(a), a[1], [a[0], "tested image"], css="query")]
        for i in matches[a][:GROUP_MEMBERS]:
            ident = (pairs["b_shard"][i], pairs["b_key"][i])
            figs.append(page.figure(("index", *ident), train_images.get(ident), ident[1],
                                    [ident[0], link_text(pairs["kind"][i], pairs["similarity"][i],
                                                         pairs["phash_distance"][i])]))
        page.section(f"{a[1]} has {counted(len(matches[a]), 'duplicate')} in the index", figs,
                     hidden=len(matches[a]) - GROUP_MEMBERS if len(matches[a]) > GROUP_MEMBERS else 0)
    intro = (f"{result.stats['leaked']} of {result.stats['images']} images of {result.stats['against']} have a "
             f"duplicate in the index. Tiers: {tiers_text(result.stats)}.")
    if len(leaked) > report_groups:
        intro += f" Showing {report_groups} of the {len(leaked)} tested images; all are in pairs.parquet."
    (out / "report.html").write_text(page.render(intro))
    return [out / "pairs.parquet", *lists, out / "report.html"]
