"""`imgindex serve` under load, one run: image queries/s and latency with 1 and 16 concurrent
clients over loopback, against the same queries through Searcher in-process and one
`search.py` process per query.

    python benchmarks/serve_throughput.py [--queries 96] [--results results.jsonl]

Builds a small index of real photos (scikit-image's) with random-init XCiT-Nano, starts the
server on a free loopback port, and sends each query image as the raw body of
POST /api/search/image. With 16 clients, queries that arrive together share one forward pass
and one faiss search (the server's batching).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from imgindex.indexes.build import build_index
from imgindex.open_index import open_searcher
from imgindex.pipeline.config import load_config
from imgindex.pipeline.demo_corpus import jpeg_bytes, photo_files, write_tar
from imgindex.pipeline.job import run_embed
from results import append_result

ROOT = Path(__file__).resolve().parent.parent


def setup(work: Path) -> tuple[Path, list[Path]]:
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    checkpoint = work / "nano.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("xcit_nano_12_p16_224").state_dict().items()},
              str(checkpoint))
    photos = [Image.open(p).convert("RGB") for p in photo_files()]
    write_tar(work / "photos-00000.tar", [(f"p{i:03d}.jpg", jpeg_bytes(photos[i % len(photos)].rotate(i * 7)))
                                          for i in range(200)])
    config = load_config("test", {"model.checkpoint": str(checkpoint)})
    run_embed([str(work / "photos-00000.tar")], str(work / "emb"), config, progress=False)
    build_index(str(work / "emb"), str(work / "idx"), progress=False)
    queries = []
    for i, photo in enumerate(photos):
        queries.append(work / f"q{i}.jpg")
        queries[-1].write_bytes(jpeg_bytes(photo.resize((500, 375))))
    return work / "idx", queries


def timed(calls, clients: int) -> dict:
    def one(call):
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, calls))
    seconds = time.perf_counter() - start
    return {"queries_per_s": round(len(calls) / seconds, 1), "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=96)
    parser.add_argument("--results", metavar="FILE")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgindex-serve-bench-"))
    index, images = setup(work)
    data = [images[i % len(images)].read_bytes() for i in range(args.queries)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "imgindex", "serve", "--index", str(index), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=32))

        def ask(body):
            return lambda: client.post(f"{url}/api/search/image?k=10", content=body).raise_for_status()

        timed([ask(d) for d in data[:8]], 1)  # warm-up
        one = timed([ask(d) for d in data], 1)
        sixteen = timed([ask(d) for d in data], 16)
    finally:
        server.terminate()
        server.wait(timeout=30)
    searcher = open_searcher(index)
    searcher.search_images(images[:2], k=10)  # the model loaded, as the server's is
    in_process = timed([lambda i=i: searcher.search_images([images[i % len(images)]], k=10)
                        for i in range(args.queries)], 1)
    start = time.perf_counter()
    runs = 3
    for i in range(runs):
        subprocess.run([sys.executable, str(ROOT / "search.py"), "--image", str(images[i]), "--index", str(index),
                        "--json"], check=True, capture_output=True)
    per_process_s = (time.perf_counter() - start) / runs
    figures = {"benchmark": "serve_throughput", "queries": args.queries, "model": "xcit_nano_12_p16_224 (random)",
               "clients_1": one, "clients_16": sixteen, "searcher_in_process_1_by_1": in_process,
               "search_py_process_per_query_s": round(per_process_s, 2),
               "clients_16_over_clients_1": round(sixteen["queries_per_s"] / one["queries_per_s"], 2),
               "clients_16_over_in_process": round(sixteen["queries_per_s"] / in_process["queries_per_s"], 2),
               "clients_16_over_search_py": round(sixteen["queries_per_s"] * per_process_s, 1)}
    print(json.dumps(figures, indent=1))
    append_result(args.results, figures)


if __name__ == "__main__":
    main()
