"""End-to-end embedding throughput vs the model's own forward and vs the model-card loop, one run.

    python benchmarks/embed_throughput.py [--model xcit_nano_12_p16_224.fb_in1k] [--count 1024]
                                          [--size imagenet|large] [--memory [1,10]] [--results results.jsonl]
                                          [--lanes N|auto] [--device cuda --batch-size auto --compile]

Writes a tar corpus of real-photo JPEGs (500x375 "imagenet" or 2048x1536 "large"), then measures
at the same batch size, threads and precision:
- forward: the model alone on random tensors already in memory, one batch at a time over all
  the threads (the model card's way);
- e2e: `run_embed` on the tars (decode, device normalization, Parquet writer);
- model card loop: PIL open + timm transform + forward, one batch at a time, in one process.
Prints `e2e/forward = R` and `speedup_vs_model_card_loop = S`.

On a CPU device the job runs in lanes (`--lanes`, one per core by default): each lane decodes
a batch and runs the forward on it with its share of the threads, side by side. The forward
alone in lanes is measured too (`lanes_forward_over_forward`). The decode shares the cores
with the forward, so e2e/forward cannot exceed `ceiling`: the best forward's core-ms plus the
decode's core-ms (the loader alone, one thread) an image, as a rate over the forward's.
With --memory, also runs `imgindex embed` in fresh processes on the corpus and on a 10x corpus
(or the multiples given: --memory 1,10,30) and prints each peak RSS.
Each measurement is repeated (--repeat, interleaved); the rates are medians and each ratio is the
median of the ratios within one attempt (measured back to back, so a slow spell of the shared
machine cancels out instead of pairing one run's luck with another's). Weights are random-init
(speed does not depend on them).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import timm
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

from imgindex.pipeline.config import load_config  # noqa: E402
from imgindex.pipeline.batches import SampleDecoder, ShardTally  # noqa: E402
from imgindex.pipeline.sources import plan_shards, read_shard  # noqa: E402
from imgindex.pipeline.demo_corpus import jpeg_bytes, photo_files, write_tar  # noqa: E402
from imgindex.pipeline.job import run_embed  # noqa: E402
from imgindex.pipeline.model import _DTYPES, auto_batch_size, load_backbone  # noqa: E402
from imgindex.pipeline.schedule import decide, machine_facts  # noqa: E402
from imgindex.pipeline.config import number_or_auto  # noqa: E402
from results import append_result  # noqa: E402

SIZES = {"imagenet": (500, 375), "large": (2048, 1536)}
PEAK_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def write_corpus(folder: Path, size: tuple[int, int], count: int, per_shard: int = 64) -> tuple[list[str], list[bytes]]:
    photos = [Image.open(p).convert("RGB").resize(size, Image.Resampling.BICUBIC) for p in photo_files()]
    images = [jpeg_bytes(photos[i % len(photos)], quality=90) for i in range(len(photos))]
    folder.mkdir(parents=True, exist_ok=True)
    tars, data = [], []
    for shard, start in enumerate(range(0, count, per_shard)):
        members = [(f"{i:07d}.jpg", images[i % len(images)]) for i in range(start, min(count, start + per_shard))]
        data += [m[1] for m in members]
        tars.append(str(write_tar(folder / f"{shard:05d}.tar", members)))
    return tars, data


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def forward_rate(backbone, batch: int, batches: int) -> float:
    """The model alone over all the threads, one batch at a time (the way the model card runs it)."""
    x = torch.randn(batch, *backbone.data_config["input_size"], device=backbone.device)
    with torch.inference_mode(), autocast(backbone.precision, backbone.device):
        backbone.model(x)
        sync(backbone.device)
        start = time.perf_counter()
        for _ in range(batches):
            backbone.model(x)
        sync(backbone.device)
    return batch * batches / (time.perf_counter() - start)


def lanes_forward_rate(backbone, batch: int, batches: int, lanes: int) -> float:
    """The model alone in `lanes` threads side by side, the threads split between them (as the
    job's lanes run it, less the decode): the sum of the lanes' rates."""
    width = max(1, torch.get_num_threads() // lanes)
    rates = []

    def lane() -> None:
        torch.set_num_threads(width)
        rates.append(forward_rate(backbone, batch, max(2, batches // lanes)))

    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(rates)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_card_rate(backbone, data: list[bytes], batch: int) -> float:
    transform = timm.data.create_transform(**backbone.data_config, is_training=False)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(backbone.precision, backbone.device):
        for i in range(0, len(data), batch):
            x = torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in data[i:i + batch]])
            backbone.model(x.to(backbone.device)).float().cpu()
    return len(data) / (time.perf_counter() - start)


def decode_ms_per_image(tars: list[str], backbone, config) -> float:
    """Core-milliseconds per image of the loader alone (read, decode, resize, hashes), one thread."""
    decoder = SampleDecoder(backbone.data_config, config.decode)
    tally = ShardTally("bench")
    for shard in plan_shards(tars, config.source):
        for sample in read_shard(shard):
            tally.add(decoder(sample))
        tally.images.clear()
    return 1000 * tally.done.decode_seconds / tally.done.samples


def peak_rss_mb(tars: list[str], out: Path, args, config) -> float:
    random = out.parent / "random.yaml"
    random.write_text("model: {pretrained: false}\n")
    cmd = [sys.executable, "-m", "imgindex", "embed", *tars, "--out", str(out), "--config", str(random),
           "--model", args.model, "--batch-size", str(config.runtime.batch_size),
           "--workers", str(config.runtime.workers), "--lanes", str(config.runtime.lanes),
           "--device", args.device, "--no-progress", "--overwrite"]
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(result.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="xcit_nano_12_p16_224.fb_in1k")
    parser.add_argument("--count", type=int, default=1024, help="images (long enough for a steady state)")
    parser.add_argument("--size", choices=SIZES, default="imagenet")
    parser.add_argument("--batch-size", type=number_or_auto, default=32, help="N, or auto (fills a GPU's memory)")
    parser.add_argument("--workers", type=number_or_auto, default="auto",
                        help="decode processes; auto: 0 (threads in-process) on a CPU, one per core on a GPU")
    parser.add_argument("--lanes", type=number_or_auto, default="auto",
                        help="CPU: batches decoded and embedded side by side; auto: one per core (max 8); "
                             "1: decode threads take turns with one forward over all threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", help="auto: fp32 on CPU, bf16 autocast on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (both sides)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved runs; medians are reported")
    parser.add_argument("--draft", action="store_true", help="reduced-size JPEG decoding (decode.draft)")
    parser.add_argument("--memory", nargs="?", const="1,10", metavar="SCALES",
                        help="also peak RSS of `imgindex embed` at these multiples of the corpus (default 1,10)")
    parser.add_argument("--results", help="append a JSON line of the figures to this file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imgindex-embed-bench-"))
    tars, data = write_corpus(work / "corpus", SIZES[args.size], args.count)
    config = load_config("cpu", {"model.name": args.model, "model.pretrained": False,
                                 "runtime.batch_size": args.batch_size, "runtime.workers": args.workers,
                                 "runtime.lanes": args.lanes,
                                 "runtime.device": args.device, "runtime.precision": args.precision,
                                 "runtime.compile": args.compile, "decode.draft": args.draft})
    schedule = decide(config.runtime, machine_facts())  # the job's own decision, as run_embed makes it
    backbone = load_backbone(config, schedule)
    batch = auto_batch_size(backbone) if schedule.batch_size == "auto" else schedule.batch_size
    config.runtime.batch_size, config.runtime.workers = batch, schedule.workers
    threads = torch.get_num_threads()
    lanes = config.runtime.lanes = schedule.lanes
    forwards, lane_forwards, e2es, cards, decodes = [], [], [], [], []
    for attempt in range(args.repeat):  # interleaved and paired: the machine is shared and drifts
        forwards.append(forward_rate(backbone, batch, max(2, args.count // batch)))
        if lanes > 1:
            lane_forwards.append(lanes_forward_rate(backbone, batch, max(2, args.count // batch), lanes))
        summary = run_embed(tars, str(work / f"out{attempt}"), config, progress=False)
        e2es.append(summary.images / summary.seconds)
        cards.append(model_card_rate(backbone, data[: max(batch * 2, min(len(data), 512))], batch))
        decodes.append(decode_ms_per_image(tars[: max(1, len(tars) // 4)], backbone, config))
    forward, e2e, card, decode_ms = (statistics.median(rates) for rates in (forwards, e2es, cards, decodes))
    over_forward = statistics.median(e / f for e, f in zip(e2es, forwards))
    over_card = statistics.median(e / c for e, c in zip(e2es, cards))
    figures = {
        "benchmark": "embed_throughput", "model": args.model, "size": args.size, "count": args.count,
        "batch_size": batch, "workers": config.runtime.workers, "lanes": lanes, "compile": args.compile,
        "device": str(backbone.device),
        "precision": backbone.precision, "draft": args.draft, "torch_threads": threads, "repeat": args.repeat,
        "forward_images_per_s": float(f"{forward:.3g}"), "e2e_images_per_s": float(f"{e2e:.3g}"),
        "model_card_images_per_s": float(f"{card:.3g}"), "e2e_over_forward": round(over_forward, 3),
        "speedup_vs_model_card_loop": round(over_card, 3), "decode_core_ms_per_image": round(decode_ms, 2),
        "machine": platform.machine() + (f", {torch.cuda.get_device_name()}" if backbone.device.type == "cuda"
                                          else f", {threads} threads"),
    }
    if lane_forwards:
        figures["lanes_forward_images_per_s"] = float(f"{statistics.median(lane_forwards):.3g}")
        figures["lanes_forward_over_forward"] = round(statistics.median(
            lf / f for lf, f in zip(lane_forwards, forwards)), 3)
    if backbone.device.type == "cpu":  # the decode's core-ms come on top of the forward's
        forward_core_ms = 1000 * threads / max(forward, figures.get("lanes_forward_images_per_s", 0))
        figures["ceiling"] = round(1000 * threads / (forward_core_ms + decode_ms) / forward, 3)
        figures["e2e_over_ceiling"] = round(figures["e2e_over_forward"] / figures["ceiling"], 3)
    scales = [int(k) for k in args.memory.split(",")] if args.memory else []
    for k in scales:
        corpus = tars if k == 1 else write_corpus(work / f"corpus{k}", SIZES[args.size], args.count * k)[0]
        figures[f"peak_rss_mb_{k}x"] = round(peak_rss_mb(corpus, work / f"m{k}", args, config), 1)
    print(json.dumps(figures, indent=1))
    print(f"e2e/forward = {figures['e2e_over_forward']}"
          + (f" (ceiling {figures['ceiling']} with decode sharing the cores: {decode_ms:.2f} core-ms an image "
             f"vs the forward's {forward_core_ms:.2f})" if "ceiling" in figures else ""))
    if lane_forwards:
        print(f"the forward alone in {lanes} lanes / over all {threads} threads = "
              f"{figures['lanes_forward_over_forward']}")
    print(f"speedup_vs_model_card_loop = {figures['speedup_vs_model_card_loop']}")
    if scales:
        print("peak RSS: " + ", ".join(f"{figures[f'peak_rss_mb_{k}x']} MB at {args.count * k} images" for k in scales))
    append_result(args.results, figures)


if __name__ == "__main__":
    main()
