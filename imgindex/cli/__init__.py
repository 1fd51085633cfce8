"""`imgindex`: the one command-line entry point, one module per command over shared argument
helpers (`args`).

Errors in the job's inputs print one line, `imgindex: error: ...`, and exit with status 2
before any work starts.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from imgindex import __version__
from imgindex.cli import dedup, demo, embed, index, search, serve
from imgindex.cli.args import Parser
from imgindex.cli.search import search_main
from imgindex.errors import ConfigError, install_hint

log = logging.getLogger("imgindex")

__all__ = ["build_parser", "main", "search_main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="imgindex", description="Image corpus -> embeddings (Parquet) -> FAISS index -> search and dedup.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (embed.register, index.register, embed.register_build, search.register, dedup.register,
                     serve.register, demo.register):
        register(sub)
    parser.add_argument("--version", action="version", version=f"imgindex {__version__}")
    for command in sub.choices.values():  # -v after the command too (`imgindex search -v`)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log more detail")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None, func=None) -> int:
    """Parse, then run the command: its input errors as one line (status 2), Ctrl-C and SIGTERM as a
    clean stop that says what to do (status 130)."""
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
        elif command == "index" and not getattr(args, "add", None) and not getattr(args, "verify", None):
            hint = "rerun the same command to resume from the finished sub-indexes"
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
