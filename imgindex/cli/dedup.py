"""`imgindex dedup`: duplicates, leakage (--against) and calibration."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from imgindex.cli.args import MAX_K, add_executor_flags, executor_from, fraction, fraction_or_auto, whole
from imgindex.errors import ConfigError
from imgindex.plurals import counted


def cmd_dedup(args: argparse.Namespace) -> int:
    from imgindex.indexes.dedup import DedupOptions, find_duplicates, find_leaks
    from imgindex.formats.embeddings_dir import EmbeddingsDir
    from imgindex.open_index import open_searcher
    from imgindex.indexes.dedup.review import write_dedup, write_leaks

    options = DedupOptions(methods=tuple(m.strip() for m in args.method.split(",") if m.strip()),
                           threshold=args.threshold, phash_distance=args.phash_distance, keep=args.keep,
                           max_neighbors=args.max_neighbors, target_precision=args.target_precision,
                           calibration_sample=args.sample, allow_random_weights=args.allow_random_weights)
    options.check()
    if args.calibrate:
        return _calibrate(args)
    if not args.dry_run and not args.out:
        raise ConfigError("--out DEDUP is needed to write the results (or --dry-run to only print them)")
    progress = False if args.no_progress else None
    executor = executor_from(args)
    work = {"workdir": args.work_dir or (None if args.dry_run else args.out), "keep_work": args.keep_work}
    searcher = open_searcher(args.index)
    if args.against:
        result = find_leaks(searcher, args.against, options, progress=progress, executor=executor,
                            device=args.device, **work)
        stats = result.stats
        print_threshold(stats)
        print(f"{stats['leaked']:,} of {counted(stats['images'], 'image')} of {args.against} have a duplicate in "
              f"the index ({counted(stats['pairs'], 'pair')}; {stats['seconds']:.1f} s)")
        if not args.dry_run:
            written = write_leaks(result, searcher, EmbeddingsDir(args.against).shard_sources(), Path(args.out))
            print("wrote " + ", ".join(str(p) for p in written))
        return 0
    result = find_duplicates(searcher, options, progress=progress, executor=executor, device=args.device, **work)
    stats = result.stats
    found = ", ".join(f"{stats.get(f'{m}_pairs', 0):,} {m}" for m in options.methods)
    print_threshold(stats)
    print(f"{counted(stats['images'], 'image')}: {counted(stats['pairs'], 'duplicate pair')} ({found}), "
          f"{counted(stats['groups'], 'group')}, {counted(stats['removed'], 'image')} to remove; "
          f"{stats['seconds']:.1f} s")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    written = write_dedup(result, searcher, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"review the groups in {Path(args.out) / 'report.html'}; nothing was deleted or moved")
    return 0


def print_threshold(stats: dict) -> None:
    chosen = stats.get("calibration")
    if chosen:
        print(f"embedding threshold {chosen['threshold']:.2f} (auto: on {chosen['copies']} planted copies of "
              f"{chosen['images']} images, recall {chosen['recall']:.3f}, precision {chosen['precision']:.3f}; "
              f"target precision {chosen['target_precision']})")


def _calibrate(args: argparse.Namespace) -> int:
    from imgindex.indexes.dedup.calibrate import calibrate, format_table

    from imgindex.open_index import open_searcher

    result = calibrate(open_searcher(args.index), sample=args.sample)
    print(format_table(result))
    if args.out and not args.dry_run:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "calibration.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {Path(args.out) / 'calibration.json'}")
    return 0


def register(sub) -> None:
    dedup = sub.add_parser(
        "dedup", help="find exact and near duplicates, or test images leaking into a training index",
        description="Find duplicates among the images of an index in three tiers (exact bytes, perceptual hash, "
                    "embedding cosine), group them, pick one to keep per group, and write pairs.parquet, "
                    "groups.parquet, keep.txt, remove.txt and report.html. Nothing is ever deleted or moved.")
    dedup.add_argument("--index", required=True, metavar="IDX", help="index directory (imgindex index --out)")
    dedup.add_argument("--out", metavar="DEDUP", help="where the results go")
    dedup.add_argument("--threshold", type=fraction_or_auto, default="auto",
                       help="cosine similarity for the embedding tier, or auto (default): the lowest threshold that "
                            "reaches --target-precision on planted copies of the corpus's own images (the chosen "
                            "value and its measured recall and precision go into summary.json)")
    dedup.add_argument("--target-precision", type=fraction, default=0.98, metavar="P",
                       help="with --threshold auto: the precision the threshold must reach on planted copies "
                            "(default 0.98)")
    dedup.add_argument("--allow-random-weights", action="store_true",
                       help="run the embedding tier on an index made with random weights (plumbing tests only: such "
                            "vectors cannot tell images apart, so it is refused otherwise)")
    dedup.add_argument("--method", default="exact,phash,embedding",
                       help="comma list of tiers: exact, phash, embedding (default all three)")
    dedup.add_argument("--phash-distance", type=whole(0, 16), default=4, metavar="BITS",
                       help="Hamming distance of the phash tier (default 4 of 64 bits)")
    dedup.add_argument("--keep", default="largest", choices=("largest", "first", "smallest-file"),
                       help="which image of a group to keep: largest pixel count then smallest key (default), "
                            "first in corpus order, or smallest file")
    dedup.add_argument("--max-neighbors", type=whole(1, MAX_K), default=100, metavar="K",
                       help="embedding tier: nearest neighbours examined per image (default 100)")
    dedup.add_argument("--against", metavar="EMB_DIR",
                       help="leakage check: which images of EMB_DIR (e.g. a test set) have a duplicate in the index")
    dedup.add_argument("--calibrate", action="store_true",
                       help="measure recall and precision per threshold by planting transformed copies "
                            "(resize, crop, JPEG, flip) of a sample of the corpus; finds no duplicates")
    dedup.add_argument("--sample", type=whole(1, 1_000_000), default=100, metavar="N",
                       help="images sampled by --calibrate and --threshold auto (default 100)")
    dedup.add_argument("--dry-run", action="store_true",
                       help="print the counts of pairs, groups and images to remove; write nothing")
    add_executor_flags(dedup, "task", "running the partitioned tiers' tasks", "--work-dir must be reachable from "
                       "every node")
    dedup.add_argument("--work-dir", metavar="DIR",
                       help="where the partitions and finished tasks go, in DIR/imgindex-dedup-work (default: "
                            "--out; with --dry-run, the system's temporary folder); removed when the run ends")
    dedup.add_argument("--keep-work", action="store_true",
                       help="keep the work folder after an interrupt or a failure: rerunning the same command then "
                            "resumes from the finished partitions and tasks")
    dedup.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                       help="where the embedding tier's products run: cpu (float32, default) or cuda (bf16, every "
                            "candidate re-scored in float32; with --procs/--ray, one GPU per worker)")
    dedup.add_argument("--no-progress", action="store_true", help="no progress bar")
    dedup.set_defaults(func=cmd_dedup)
