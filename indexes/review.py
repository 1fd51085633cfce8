"""Dedup results on disk, for tools and for people: pairs.parquet, groups.parquet, keep.txt,
remove.txt (or leaks.txt) and a self-contained report.html of thumbnails.

Nothing here deletes or moves an image: the lists are for other tools to act on.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.indexes.dedup import DedupResult
from imgindex.indexes.gallery import fetch_images, figure, page, thumbnail_uri
from imgindex.indexes.query import Searcher, sample_path

REPORT_GROUPS = 200


def _paths(sources: dict[str, dict], shards: list[str], keys: list[str]) -> list[str]:
    """Where each image lives (file path, or TAR#KEY); shard/key when the source is unknown."""
    out = []
    for shard, key in zip(shards, keys):
        stats = sources.get(shard, {})
        out.append(sample_path(stats.get("kind"), stats.get("source"), key) or f"{shard}/{key}")
    return out


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def write_dedup(result: DedupResult, searcher: Searcher, out: Path, report_groups: int = REPORT_GROUPS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.pairs, out / "pairs.parquet")
    pq.write_table(result.groups, out / "groups.parquet")
    sources = searcher.sources()
    groups = result.groups.to_pydict()
    paths = _paths(sources, groups["shard"], groups["key"])
    _write_lines(out / "keep.txt", [p for p, keep in zip(paths, groups["keep"]) if keep])
    _write_lines(out / "remove.txt", [p for p, keep in zip(paths, groups["keep"]) if not keep])
    (out / "summary.json").write_text(json.dumps(result.stats, indent=2))
    (out / "report.html").write_text(dedup_report(result.groups, sources, result.stats, report_groups))
    return [out / name for name in ("pairs.parquet", "groups.parquet", "keep.txt", "remove.txt", "report.html")]


def dedup_report(groups: pa.Table, sources: dict[str, dict], stats: dict, limit: int) -> str:
    """Groups largest first, thumbnails side by side, similarity to the kept image under each."""
    rows = groups.to_pylist()
    by_group: dict[int, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row["group_id"], []).append(row)
    ordered = sorted(by_group.values(), key=lambda members: (-len(members), members[0]["group_id"]))
    shown = ordered[:limit]
    images = fetch_images(sources, {(m["shard"], m["key"]) for members in shown for m in members})
    sections = []
    for members in shown:
        figs = [figure(thumbnail_uri(images.get((m["shard"], m["key"]))),
                       ("KEEP  " if m["keep"] else "") + m["key"],
                       [m["shard"], f"similarity {m['similarity']:.4f}", m["reason"]],
                       css="keep" if m["keep"] else "")
                for m in sorted(members, key=lambda m: (not m["keep"], -m["similarity"]))]
        first = members[0]
        sections.append((f"group {first['group_id']}: {first['group_size']} images, "
                         f"min similarity {first['min_similarity']:.4f}", figs))
    intro = (f"{stats.get('groups', len(by_group))} groups, {stats.get('removed', 0)} images to remove "
             f"(methods {', '.join(stats.get('methods', []))}; threshold {stats.get('threshold')}, "
             f"phash distance {stats.get('phash_distance')}; keep policy {stats.get('keep')}). "
             f"The kept image of each group is framed in blue.")
    if len(ordered) > limit:
        intro += f" Showing the {limit} largest groups of {len(ordered)}; all are in groups.parquet."
    return page("imgindex duplicates", sections, intro=intro)


def write_leaks(result: DedupResult, searcher: Searcher, against_sources: dict[str, dict], out: Path,
                report_groups: int = REPORT_GROUPS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.pairs, out / "pairs.parquet")
    pairs = result.pairs.to_pydict()
    leaked = list(dict.fromkeys(zip(pairs["a_shard"], pairs["a_key"])))
    _write_lines(out / "leaks.txt", _paths(against_sources, [s for s, _ in leaked], [k for _, k in leaked]))
    (out / "summary.json").write_text(json.dumps(result.stats, indent=2))
    train_sources = searcher.sources()
    shown = leaked[:report_groups]
    test_images = fetch_images(against_sources, shown)
    matches: dict[tuple[str, str], list[int]] = {}
    for i, a in enumerate(zip(pairs["a_shard"], pairs["a_key"])):
        matches.setdefault(a, []).append(i)
    train_images = fetch_images(train_sources, {(pairs["b_shard"][i], pairs["b_key"][i])
                                                for a in shown for i in matches[a]})
    sections = []
    for a in shown:
        figs = [figure(thumbnail_uri(test_images.get(a)), a[1], [a[0], "tested image"], css="query")]
        figs += [figure(thumbnail_uri(train_images.get((pairs["b_shard"][i], pairs["b_key"][i]))), pairs["b_key"][i],
                        [pairs["b_shard"][i], f"{pairs['kind'][i]}, similarity {pairs['similarity'][i]:.4f}"])
                 for i in matches[a]]
        sections.append((f"{a[1]} has {len(matches[a])} duplicate(s) in the index", figs))
    intro = (f"{result.stats['leaked']} of {result.stats['images']} images of {result.stats['against']} have a "
             f"duplicate in the index (methods {', '.join(result.stats['methods'])}; threshold "
             f"{result.stats['threshold']}).")
    (out / "report.html").write_text(page("imgindex leakage check", sections, intro=intro))
    return [out / name for name in ("pairs.parquet", "leaks.txt", "report.html")]
