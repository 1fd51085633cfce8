"""`imgindex index`: build, extend (--add) or verify an index."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from imgindex.cli.args import add_executor_flags, add_index_flags, executor_from
from imgindex.errors import ConfigError
from imgindex.plurals import counted

if TYPE_CHECKING:  # faiss loads only when an index is built or read
    from imgindex.formats.index_dir import IndexManifest


def build_options(args: argparse.Namespace):
    from imgindex.indexes.build import BuildOptions

    return BuildOptions(index_key=args.index_key, max_memory=args.max_memory, target_recall=args.target_recall,
                        on_disk=args.on_disk)


def print_index(manifest: IndexManifest, out: str) -> None:
    params = ", ".join(f"{k}={v}" for k, v in manifest.search_params.items()) or "exact"
    print(f"index {manifest.factory} of {manifest.count} vectors ({manifest.selection}) -> {out}")
    from imgindex.indexes.build import K

    print(f"recall@{K} vs exact search: {manifest.recall_at_10:.4f} on {manifest.recall_queries} "
          f"held-out queries with {params}")


def cmd_index(args: argparse.Namespace) -> int:
    from imgindex.indexes.build import add_parts, build_index

    if args.verify:
        from imgindex.indexes.build import verify_index

        checked = verify_index(args.verify)
        print(f"{args.verify}: {checked['files']} index files and {checked['parts']} parts match their digests")
        return 0
    if bool(args.emb_dir) == bool(args.add):
        raise ConfigError("give EMB_DIR to build a new index, or --add EMB_DIR to extend the one at --out")
    if not args.out:
        raise ConfigError("--out IDX is needed: the index directory to write")
    progress = False if args.no_progress else None
    if args.add:
        manifest, added = add_parts(args.add, args.out, target_recall=args.target_recall, progress=progress,
                                    executor=executor_from(args))
        if not added:
            print(f"nothing to add: every complete part of {args.add} is already in {args.out}")
            return 0
        last = manifest.adds[-1]
        print(f"added {added} vectors from {last['parts']} new parts to {args.out} "
              f"in {last['seconds']:.1f} s (drift ratio {last['drift_ratio']})")
        if last.get("recall_at_10_of_new") is not None:
            print(f"recall@10 of the new vectors {last['recall_at_10_of_new']:.4f} ({last['of_new_covers']})")
    else:
        executor = executor_from(args)
        manifest = build_index(args.emb_dir, args.out, build_options(args), overwrite=args.overwrite,
                               progress=progress, executor=executor)
        run = manifest.build["executor"]
        word = executor.worker_word
        how = (f" by {counted(run['workers'], word, word + 'es' if word.endswith('s') else None)} ({executor.flag})"
               if executor.kind != "local" else "")
        retried = f"; {counted(run['retried'], 'task')} retried" if run["retried"] else ""
        resumed = f"; {run['resumed_tasks']} of {run['tasks']} tasks were done before" if run["resumed_tasks"] else ""
        print(f"built in {manifest.timings['total_s']:.1f} s{how}{retried}{resumed}")
    print_index(manifest, args.out)
    return 0


def register(sub) -> None:
    index = sub.add_parser(
        "index", help="build a FAISS index from an embeddings directory",
        description="Stream the Parquet parts of EMB_DIR into a FAISS index at --out (index.faiss, ids.parquet, "
                    "manifest.json). The index type is chosen from the vector count and --max-memory unless "
                    "--index-key is given; recall@10 vs exact search is measured and written to the manifest.")
    index.add_argument("emb_dir", nargs="?", metavar="EMB_DIR", help="embeddings directory (imgindex embed --out)")
    index.add_argument("--out", metavar="IDX", help="index directory")
    index.add_argument("--verify", metavar="IDX",
                       help="check every byte of the index at IDX and every part it was built from against the "
                            "digests its manifest records (loading checks the sizes and a sample of the bytes)")
    index.add_argument("--add", metavar="EMB_DIR",
                       help="add the parts of EMB_DIR not yet in the index at --out, without retraining")
    index.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    add_executor_flags(index, "task", "adding its runs of parts into a sub-index",
                       "the driver trains once and merges the sub-indexes; EMB_DIR and IDX must be reachable from "
                       "every node")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_index_flags(index)
    index.set_defaults(func=cmd_index)
