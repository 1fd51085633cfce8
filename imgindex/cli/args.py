"""Argument helpers every command shares: one-line usage errors, number types, the model and
index flag groups, the config the flags override, and the executor flags."""
from __future__ import annotations

import argparse
from collections.abc import Callable

from imgindex.pipeline.config import EmbedConfig, config_keys, load_config

MAX_K = 100_000  # hits per query, neighbours per image


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command."""

    def error(self, message: str) -> None:
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""  # `imgindex index` -> index
        self.exit(2, f"imgindex: error: {command}{message}\n")


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


def fraction_or_auto(text: str) -> float | str:
    return text if text == "auto" else fraction(text)


def count_or_auto(text: str) -> int | str:
    return text if text == "auto" else whole(1, 100_000)(text)


class _ConfigHelp(str):
    """A flag's help that names the config's value ({value}), read from the config only when help
    is shown (argparse expands a help text with `%`), not on every command."""

    def __new__(cls, text: str, config: str, dotted: str) -> "_ConfigHelp":
        help_text = super().__new__(cls, text)
        help_text.config, help_text.dotted = config, dotted
        return help_text

    def __mod__(self, params) -> str:
        value = load_config(self.config)
        for part in self.dotted.split("."):
            value = getattr(value, part)
        return str(self).format(value=value, config=self.config) % params


def add_model_flags(parser: argparse.ArgumentParser, config: str = "default") -> None:
    """--config, then a flag for every config key that declares one (pipeline.config.key)."""
    group = parser.add_argument_group("model and runtime (override the config file)")
    group.add_argument("--config", metavar="FILE",
                       help=f"YAML config: a path, or a shipped name (default, cpu, test); default: {config}")
    for dotted, spec in config_keys().items():
        flag, cli = spec.metadata["flag"], dict(spec.metadata["cli"])
        if not flag:
            continue
        text = cli.pop("help")
        help_text = _ConfigHelp(text, config, dotted) if "{value}" in text else text
        if spec.type in (bool, "bool"):
            group.add_argument(flag, dest=dotted, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=dotted, type=cli.pop("parse", None), help=help_text, **cli)


def config_from(args: argparse.Namespace, base: str | None = None) -> EmbedConfig:
    """The config the command runs with: --config (or `base`), then every flag given."""
    overrides = {dotted: getattr(args, dotted) for dotted, spec in config_keys().items()
                 if spec.metadata["flag"] and hasattr(args, dotted)}
    return load_config(args.config or base, overrides)


def add_index_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("index")
    group.add_argument("--index-key", metavar="FACTORY",
                       help="any faiss.index_factory string (default: chosen from the vector count and --max-memory)")
    group.add_argument("--max-memory", default="16G", metavar="SIZE", help="memory budget of the index (default 16G)")
    group.add_argument("--target-recall", type=fraction, default=0.95, metavar="R",
                       help="tune nprobe/efSearch to reach this recall@10 vs exact search (default 0.95)")
    group.add_argument("--on-disk", choices=("auto", "always", "never"), default="auto",
                       help="keep an IVF index's inverted lists in IDX/index.ivfdata, memory-mapped when searched: "
                            "auto (default) when they exceed --max-memory")


def add_executor_flags(parser: argparse.ArgumentParser, task: str, holding: str, storage: str) -> None:
    """--procs N, --ray N|auto and --retries K: where the command's `task`s run (executors/)."""
    group = parser.add_argument_group("executor (default: this process)")
    group.add_argument("--procs", type=whole(1, 1024), metavar="N",
                       help=f"a pool of N worker processes on this machine, each {holding} and taking the next {task} "
                            "when free: one per GPU (process k sees GPU k), each on its own share of the CPU cores")
    group.add_argument("--ray", type=count_or_auto, metavar="N",
                       help=f"a pool of N Ray actors on the cluster at RAY_ADDRESS (else a local Ray), each {holding} "
                            f"and taking the next {task} when free; auto: one per GPU of the cluster (one per node's "
                            f"cores on CPU nodes); {storage}")
    group.add_argument("--retries", type=whole(0, 100), default=2, metavar="K",
                       help=f"with --procs or --ray: a {task} whose worker died or failed is handed out again up "
                            "to K times (default 2)")


def executor_from(args: argparse.Namespace):
    """The Executor the flags of add_executor_flags ask for."""
    from imgindex.executors.placement import Executor

    return Executor.from_flags(procs=args.procs, ray=args.ray, retries=args.retries)
