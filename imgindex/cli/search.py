"""`imgindex search` and `python search.py`: which images look like this one?"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from imgindex.cli.args import MAX_K, Parser, whole
from imgindex.errors import ConfigError


def query_files(args: argparse.Namespace) -> list[Path]:
    from imgindex.formats.samples import IMAGE_EXTENSIONS

    files = [Path(p) for p in args.image or []]
    for path in files:
        if not path.is_file():
            raise ConfigError(f"query image {path} does not exist (or is not a file)")
    if args.dir:
        folder = Path(args.dir)
        if not folder.is_dir():
            raise ConfigError(f"--dir {folder} is not a folder")
        found = sorted(p for p in folder.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTENSIONS)
        if not found:
            raise ConfigError(f"--dir {folder} holds no images")
        files += found
    return files


def print_hits(label: str, hits: list) -> None:
    print(f"query: {label}")
    print(f"{'rank':>4}  {'score':>8}  {'shard':<16} {'key':<28} caption / path")
    for hit in hits:
        extra = hit.caption or hit.url or hit.path or ""
        print(f"{hit.rank:>4}  {hit.score:>8.5f}  {hit.shard:<16} {hit.key:<28} {extra[:60]}")
    print()


def write_search_html(path: str, searcher, results: list[tuple[str, bytes | None, list]]) -> None:
    from imgindex.indexes.gallery import Page, fetch_images

    images = fetch_images(searcher.sources(), {(h.shard, h.key) for _, _, hits in results for h in hits},
                          searcher.member_ranges)
    page = Page("imgindex search")
    for number, (label, data, hits) in enumerate(results):
        figs = [page.figure(("query", number), data, "query", [label], css="query")]
        figs += [page.figure((h.shard, h.key), images.get((h.shard, h.key)), f"#{h.rank}  {h.score:.5f}",
                             [h.key, h.shard, h.caption]) for h in hits]
        page.section(f"query: {label}", figs)
    Path(path).write_text(page.render(intro=f"index: {searcher.dir.path}"))


def cmd_search(args: argparse.Namespace) -> int:
    from imgindex.open_index import open_searcher

    files = query_files(args)
    if not files and not args.key:
        raise ConfigError("nothing to search for: pass --image FILE, --dir FOLDER or --key KEY")
    params = {"nprobe": args.nprobe, "efSearch": args.ef_search}
    searcher = open_searcher(args.index, args.device, args.checkpoint, params={k: v for k, v in params.items() if v},
                             model=args.model)
    results: list[tuple[str, bytes | None, list]] = []
    if files:
        hits = searcher.search_images(files, k=args.k)
        results += [(str(f), f.read_bytes(), h) for f, h in zip(files, hits)]
    if args.key:
        hits = searcher.search_keys(args.key, k=args.k, shard=args.shard)
        results += [(f"key {key}", None, h) for key, h in zip(args.key, hits)]
    for label, _, hits in results:
        if args.json:
            print(json.dumps({"query": label, "hits": [h.to_dict() for h in hits]}))
        else:
            print_hits(label, hits)
    if args.html:
        write_search_html(args.html, searcher, results)
        if not args.json:
            print(f"wrote {args.html}")
    return 0


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", metavar="FILE", help="query image (repeatable)")
    parser.add_argument("--dir", metavar="FOLDER", help="every image in FOLDER is a query")
    parser.add_argument("--key", action="append", metavar="KEY",
                        help="a key already in the index: 'more like this one' (repeatable)")
    parser.add_argument("--shard", metavar="SHARD", help="the shard of --key, when the key is in several")
    parser.add_argument("-k", type=whole(1, MAX_K), default=10, help="hits per query (default 10)")
    parser.add_argument("--index", default="index", metavar="IDX", help="index directory (default ./index)")
    parser.add_argument("--json", action="store_true", help="one JSON object per query, for scripts")
    parser.add_argument("--html", metavar="FILE", help="also write a page with the query and hit thumbnails")
    parser.add_argument("--model", metavar="NAME", help="fail unless the index was built with this model")
    parser.add_argument("--device", metavar="DEV", help="where to embed query images (default auto)")
    parser.add_argument("--checkpoint", metavar="FILE", help="weights file, if it moved since the index was built")
    parser.add_argument("--nprobe", type=whole(1, 2**20), help="override the tuned nprobe (IVF indexes)")
    parser.add_argument("--ef-search", type=whole(1, 2**20), help="override the tuned efSearch (HNSW indexes)")


def search_main(argv: list[str] | None = None) -> int:
    """`python search.py ...`: the same as `imgindex search ...`."""
    parser = Parser(
        prog="search.py", description="Which images look like this one? Query an imgindex index "
        "by image files, a folder of images, or keys already in the index.")
    add_search_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    from imgindex.cli import run

    return run(parser, argv, cmd_search)


def register(sub) -> None:
    search = sub.add_parser(
        "search", help="query an index by image, folder or key (same as search.py)",
        description="Which images look like this one? Prints a table per query, or JSON lines with --json.")
    add_search_arguments(search)
    search.set_defaults(func=cmd_search)
