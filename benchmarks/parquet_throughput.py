"""Images/s reading (and decoding) the same images from a Parquet file and from a tar.

    python benchmarks/parquet_throughput.py [--count 1000] [--rounds 3] [--results results.jsonl]

The same JPEGs (500x375, made from scikit-image's photos) are written once as a webdataset tar
(key.jpg + key.txt) and once as a Parquet file in img2dataset's `parquet` layout (key, caption,
jpg; row groups of 100 rows, as img2dataset writes them), each planned as one shard. Then, in
one process, the job's own path: `read_shard` alone (read), and `read_shard` + the decode
worker's per-sample work (`SampleDecoder`: header checks, upright, sha256, phash, timm's resize
and crop for XCiT-Nano) (read+decode). Rounds alternate tar and Parquet; medians are printed,
with the Parquet/tar ratio of each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import timm
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from imgindex.pipeline.batches import SampleDecoder  # noqa: E402
from imgindex.pipeline.config import SourceConfig, load_config  # noqa: E402
from imgindex.pipeline.demo_corpus import jpeg_bytes, photo_files, write_tar  # noqa: E402
from imgindex.pipeline.sources import plan_shards, read_shard  # noqa: E402
from results import append_result  # noqa: E402


def corpus(count: int) -> list[bytes]:
    photos = [Image.open(p).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC) for p in photo_files()]
    return [jpeg_bytes(photos[i % len(photos)].rotate(i % 7), quality=90) for i in range(count)]


def write_both(folder: Path, images: list[bytes]) -> dict[str, Path]:
    keys = [f"{i:09d}" for i in range(len(images))]
    tar = write_tar(folder / "bench.tar", [m for k, data in zip(keys, images)
                                           for m in ((f"{k}.jpg", data), (f"{k}.txt", f"photo {k}".encode()))])
    table = pa.table({"key": keys, "caption": [f"photo {k}" for k in keys], "jpg": pa.array(images, pa.binary())})
    parquet = folder / "bench.parquet"
    pq.write_table(table, parquet, row_group_size=100)
    return {"tar": tar, "parquet": parquet}


def timed(shard, decoder: SampleDecoder | None) -> tuple[float, int]:
    start = time.perf_counter()
    count = 0
    for sample in read_shard(shard):
        if decoder is not None:
            decoder(sample)
        count += sample.data is not None
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", help="append a JSON line of the figures to this file")
    args = parser.parse_args()

    config = load_config("test")
    data_config = timm.data.resolve_model_data_config(timm.create_model(config.model.name, pretrained=False))
    decoder = SampleDecoder(data_config, config.decode)
    images = corpus(args.count)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_both(Path(tmp), images)
        shards = {kind: plan_shards([str(path)], SourceConfig(folder_shard_size=10**9))[0] for kind, path in paths.items()}
        sizes = {kind: path.stat().st_size for kind, path in paths.items()}
        rates: dict[str, list[float]] = {f"{kind}_{what}": [] for kind in shards for what in ("read", "decode")}
        timed(shards["tar"], decoder)  # warm up: page cache, timm's transform
        for round_ in range(args.rounds):
            order = ["tar", "parquet"] if round_ % 2 == 0 else ["parquet", "tar"]
            for what, dec in (("read", None), ("decode", decoder)):
                for kind in order:
                    seconds, count = timed(shards[kind], dec)
                    assert count == args.count, (kind, count)
                    rates[f"{kind}_{what}"].append(count / seconds)
    med = {name: statistics.median(values) for name, values in rates.items()}
    figures = {"benchmark": "parquet_throughput", "count": args.count, "rounds": args.rounds,
               "bytes": sizes, **{f"{name}_images_per_s": round(v, 1) for name, v in med.items()},
               "read_ratio_parquet_vs_tar": round(med["parquet_read"] / med["tar_read"], 3),
               "decode_ratio_parquet_vs_tar": round(med["parquet_decode"] / med["tar_decode"], 3)}
    print(f"{args.count} JPEGs 500x375, {sizes['tar'] / 1e6:.1f} MB tar, {sizes['parquet'] / 1e6:.1f} MB Parquet; "
          f"medians of {args.rounds} rounds")
    print(f"read:        tar {med['tar_read']:9.1f}  parquet {med['parquet_read']:9.1f} images/s  "
          f"parquet/tar {figures['read_ratio_parquet_vs_tar']:.3f}")
    print(f"read+decode: tar {med['tar_decode']:9.1f}  parquet {med['parquet_decode']:9.1f} images/s  "
          f"parquet/tar {figures['decode_ratio_parquet_vs_tar']:.3f}")
    append_result(args.results, figures)


if __name__ == "__main__":
    main()
