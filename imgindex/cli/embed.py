"""`imgindex embed` and `imgindex build` (embed, then index)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgindex.cli.args import add_executor_flags, executor_from, add_index_flags, add_model_flags, config_from
from imgindex.cli.index import build_options, print_index
from imgindex.plurals import counted


def cmd_embed(args: argparse.Namespace) -> int:
    from imgindex.pipeline.job import run_embed

    config = config_from(args)
    summary = run_embed(args.sources, args.out, config, overwrite=args.overwrite, slice_=args.slice,
                        progress=False if args.no_progress else None, executor=executor_from(args))
    print(summary.line())
    for shard, error in sorted(summary.shards_failed.items()):
        print(f"imgindex: error: shard {shard} failed {args.retries + 1} times: {error}", file=sys.stderr)
    if summary.shards_failed:
        print(f"imgindex: {counted(len(summary.shards_failed), 'shard')} not done; rerun the same command to finish "
              "them", file=sys.stderr)
    return 1 if summary.shards_failed else 0


def cmd_build(args: argparse.Namespace) -> int:
    from imgindex.indexes.build import build_index
    from imgindex.pipeline.job import run_embed

    config = config_from(args)
    progress = False if args.no_progress else None
    summary = run_embed(args.sources, args.out, config, overwrite=args.overwrite, progress=progress)
    print(summary.line())
    index_dir = str(Path(args.out) / "index")
    manifest = build_index(args.out, index_dir, build_options(args), overwrite=True, progress=progress)
    print_index(manifest, index_dir)
    return 0


def register(sub) -> None:
    embed = sub.add_parser(
        "embed", help="embed images into Parquet parts, one per input shard",
        description="Embed images with a timm backbone into OUT/embeddings/part-<shard>.parquet. "
                    "Rerunning the same command finishes only the shards that are not done.")
    embed.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="tar shards (paths, globs, {000..099} patterns, fsspec URLs), "
                            "image folders, .txt/.parquet file lists, or Parquet files holding the images "
                            "(Hugging Face datasets, img2dataset's parquet output; source.image_column)")
    embed.add_argument("--out", required=True, metavar="DIR", help="embeddings directory (local path or URL)")
    embed.add_argument("--overwrite", action="store_true",
                       help="delete existing parts in DIR and start again (needed to change model or preprocessing)")
    embed.add_argument("--slice", metavar="I/N", help="take only shards I, I+N, ... (SLURM arrays, one task per "
                       "slice, all with the same --out; with any executor; not with --overwrite: clear DIR once "
                       "first)")
    add_executor_flags(embed, "shard", "holding the model", "DIR must be reachable from every node")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_flags(embed)
    embed.set_defaults(func=cmd_embed)


def register_build(sub) -> None:
    build = sub.add_parser(
        "build", help="embed then index, in one go",
        description="imgindex embed SOURCE... --out DIR, then imgindex index DIR --out DIR/index.")
    build.add_argument("sources", nargs="+", metavar="SOURCE", help="as for imgindex embed")
    build.add_argument("--out", required=True, metavar="DIR", help="embeddings directory; the index goes to DIR/index")
    build.add_argument("--overwrite", action="store_true", help="start the embeddings again (see imgindex embed)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_flags(build)
    add_index_flags(build)
    build.set_defaults(func=cmd_build)
