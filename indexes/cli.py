"""`imgindex`: the one command-line entry point (embed, demo).

Errors in the job's inputs print one line, `imgindex: error: ...`, and exit with status 2
before any work starts.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError, EmbedConfig, load_config

log = logging.getLogger("imgindex")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and runtime (override the config file)")
    group.add_argument("--config", metavar="FILE",
                       help="YAML config: a path, or a name in configs/ (default, cpu, test)")
    group.add_argument("--model", metavar="NAME", help="timm model name (default xcit_large_24_p8_224.fb_in1k)")
    group.add_argument("--checkpoint", metavar="FILE", help="local weights (safetensors or .pth) instead of the hub")
    group.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass")
    group.add_argument("--device", metavar="DEV", help="auto (default), cpu, cuda or cuda:N")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                       help="auto = bf16 autocast on CUDA, fp32 on CPU")
    group.add_argument("--workers", type=int, metavar="N", help="decode worker processes (0 = in-process)")
    group.add_argument("--compile", action="store_true", default=None, help="torch.compile the backbone")


def _config_from(args: argparse.Namespace, base: str | None = None) -> EmbedConfig:
    overrides = {
        "model.name": args.model, "model.checkpoint": args.checkpoint,
        "runtime.batch_size": args.batch_size, "runtime.device": args.device,
        "runtime.precision": args.precision, "runtime.workers": args.workers,
        "runtime.compile": args.compile,
    }
    return load_config(args.config or base, overrides)


def _warn_if_cpu_by_default(config: EmbedConfig) -> None:
    import torch

    if config.runtime.device == "auto" and not torch.cuda.is_available():
        log.warning("no CUDA GPU visible: embedding on the CPU in fp32 (slow for large models); "
                    "--device cpu silences this")


def cmd_embed(args: argparse.Namespace) -> int:
    from pipeline.embed import run_embed

    config = _config_from(args)
    _warn_if_cpu_by_default(config)
    summary = run_embed(args.sources, args.out, config, overwrite=args.overwrite, slice_=args.slice,
                        progress=False if args.no_progress else None)
    print(summary.line())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo_corpus import write_demo_corpus
    from pipeline.embed import run_embed

    out = Path(args.out)
    config = _config_from(args, base="cpu")
    if not args.checkpoint:
        config.model.pretrained = False
    shards = write_demo_corpus(out / "corpus")
    print(f"demo corpus: {len(shards)} tar shards of real photos in {out / 'corpus'}")
    if config.model.checkpoint:
        print(f"model: {config.model.name} with weights from {config.model.checkpoint}")
    else:
        print(f"model: {config.model.name} with RANDOM weights (seed {config.seed}): the pipeline runs "
              "end to end, but similarities mean nothing. Pass --checkpoint FILE for real weights.")
    summary = run_embed([str(p) for p in shards], str(out / "vectors"), config, overwrite=True,
                        progress=False if args.no_progress else None)
    print(summary.line())
    vectors = out / "vectors"
    print(f"parts: {vectors / 'embeddings'}; failures: {vectors / 'failures'}; "
          f"manifest: {vectors / '_manifest.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    embed.add_argument("--slice", metavar="I/N", help="take only shards I, I+N, ... (SLURM arrays, one process per GPU)")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_flags(embed)
    embed.set_defaults(func=cmd_embed)

    demo = sub.add_parser(
        "demo", help="build a small corpus of real photos and run the pipeline on it",
        description="Writes two tar shards of the photos scikit-image ships, then embeds them on the CPU "
                    "with XCiT-Nano. Weights are random unless --checkpoint is given.")
    demo.add_argument("--out", default="demo-out", metavar="DIR", help="where the corpus and outputs go")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_flags(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="imgindex: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"imgindex: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgindex: interrupted; rerun the same command to finish the remaining shards", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
