"""Writes tests/data/img2dataset-00000.parquet with img2dataset itself (its `parquet` output
format), from a CSV of file:// URLs: no network. Run it again after an img2dataset upgrade:

    pip install img2dataset && python tests/data/make_img2dataset_parquet.py

Not run by the tests (img2dataset pins webdataset<0.3 and brings wandb and OpenCV, so it is
not in the dev extra); the tests read the file it wrote.

Rows: four photos (resized to 64 pixels, re-encoded as JPEG by img2dataset), a URL that does
not exist (status failed_to_download) and a text file named .jpg (failed_to_resize).
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHOTOS = ("coffee", "chelsea", "rocket", "astronaut")


def main() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download
    from PIL import Image

    sys.path.insert(0, str(HERE.parent.parent))
    from imgindex.pipeline.demo_corpus import jpeg_bytes, photo_files

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {p.stem: p for p in photo_files()}
        rows = []
        for name in PHOTOS:
            path = tmp / f"{name}.jpg"
            path.write_bytes(jpeg_bytes(Image.open(files[name]).convert("RGB").resize((96, 64))))
            rows.append((path.as_uri(), f"a photo of {name}"))
        rows.append(((tmp / "missing.jpg").as_uri(), "gone"))
        (tmp / "notes.jpg").write_text("not an image\n" * 10)
        rows.append(((tmp / "notes.jpg").as_uri(), "a text file"))
        with open(tmp / "urls.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            writer.writerows(rows)
        out = tmp / "out"
        download(url_list=str(tmp / "urls.csv"), input_format="csv", url_col="url", caption_col="caption",
                 output_format="parquet", output_folder=str(out), processes_count=1, thread_count=2,
                 image_size=64, resize_mode="keep_ratio", encode_format="jpg", timeout=5, retries=0,
                 disallowed_header_directives=[], enable_wandb=False, distributor="multiprocessing")
        (written,) = out.glob("*.parquet")
        shutil.copy(written, HERE / "img2dataset-00000.parquet")
        print(f"wrote {HERE / 'img2dataset-00000.parquet'} with img2dataset")


if __name__ == "__main__":
    main()
