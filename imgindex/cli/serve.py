"""`imgindex serve`: the HTTP service and its page."""
from __future__ import annotations

import argparse

from imgindex.cli.args import whole
from imgindex.errors import ConfigError


def cmd_serve(args: argparse.Namespace) -> int:
    from imgindex.indexes.factory import parse_memory
    from imgindex.serve import serve

    max_upload = parse_memory(args.max_upload, "--max-upload")
    if max_upload < 1:
        raise ConfigError(f"--max-upload {args.max_upload!r} admits no image: give a size above 0, e.g. 20M")
    serve(args.index, host=args.host, port=args.port, token=args.token, max_upload=max_upload, device=args.device)
    return 0


def register(sub) -> None:
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
