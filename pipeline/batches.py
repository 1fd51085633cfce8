"""Samples -> model inputs, and the tally of a shard: typed decode results, the per-shard
accounting (rows + failures = samples; tar members that are no samples are counted apart),
and uint8 batches.

SampleDecoder is picklable (it builds timm's transform lazily), so decode processes get their
own copy; pipeline.shard_job decides who calls it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from imgindex.formats.records import PartRow, add_row, row_columns
from imgindex.pipeline.config import DecodeConfig
from imgindex.pipeline.decode import (SampleError, build_preprocess, draft_side, is_grayscale, is_near_constant,
                                      open_upright, phash, sha256, stack_nchw)
from imgindex.pipeline.sources import Sample


@dataclass
class Batch:
    shard: str
    images: torch.Tensor  # uint8, N x C x H x W
    rows: dict[str, list]  # PartRow's fields -> one value per image

    def pin_memory(self) -> "Batch":
        """Page-locked, so the copy to the GPU is asynchronous."""
        return Batch(self.shard, self.images.pin_memory(), self.rows)


@dataclass
class ShardDone:
    """The tally of a shard (or of one batch of it): samples, failures and what else was seen."""

    shard: str
    samples: int
    failures: list[dict] = field(default_factory=list)  # key, member, error, message
    decode_seconds: float = 0.0
    near_constant: int = 0  # embedded images with (almost) one colour: no signal for the model
    skipped: dict[str, int] = field(default_factory=dict)  # tar members that are no sample, by reason
    started: float = field(default_factory=time.time)  # when its reading began (wall clock)

    def merge(self, part: "ShardDone") -> None:
        """Add the tally of one batch of this shard."""
        self.samples += part.samples
        self.failures.extend(part.failures)
        self.decode_seconds += part.decode_seconds
        self.near_constant += part.near_constant
        for reason, count in part.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count


@dataclass
class Decoded:
    """A sample ready for the model: uint8 CHW pixels and its part row."""

    pixels: np.ndarray
    row: PartRow
    near_constant: bool
    seconds: float


@dataclass
class Failed:
    """A sample that cannot be embedded: its failures row."""

    row: dict
    seconds: float


@dataclass
class Skipped:
    """A tar member that is no sample (a directory, a link...), counted in the stats by reason."""

    reason: str
    seconds: float = 0.0


class SampleDecoder:
    """One sample -> Decoded, Failed or Skipped; the model's preprocessing and the decode config."""

    def __init__(self, data_config: dict, decode: DecodeConfig):
        self.data_config, self.decode = data_config, decode
        self.draft_side = draft_side(decode, data_config)
        self._preprocess = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_preprocess": None}  # timm's transform is rebuilt where it runs

    def __call__(self, sample: Sample) -> Decoded | Failed | Skipped:
        if sample.skipped:
            return Skipped(sample.skipped)
        if self._preprocess is None:
            self._preprocess = build_preprocess(self.data_config)
        start = time.perf_counter()
        try:
            if sample.error:
                raise SampleError(*sample.error)
            img, width, height = open_upright(sample.data, self.decode.max_pixels, self.decode.alpha_background,
                                              self.draft_side)
            pixels = self._preprocess(img)
            row = PartRow(key=sample.key, key_bytes=sample.key_bytes, width=width, height=height,
                          bytes=len(sample.data), member_offset=sample.offset, grayscale=is_grayscale(pixels),
                          sha256=sha256(sample.data), phash=phash(img), caption=sample.caption, json=sample.json,
                          url=sample.url)
            return Decoded(pixels, row, is_near_constant(pixels), time.perf_counter() - start)
        except SampleError as exc:
            failure = {"key": sample.key, "member": sample.member, "error": exc.kind, "message": str(exc)}
        except Exception as exc:  # an unforeseen decoder error is this sample's, not the job's
            failure = {"key": sample.key, "member": sample.member,
                       "error": "decode_error", "message": f"{type(exc).__name__}: {exc}"}
        return Failed(failure, time.perf_counter() - start)


class ShardTally:
    """Decoded samples of one shard, in sample order, until they are taken as a Batch; and the
    tally (samples, failures, near-constant images, decode time) that becomes its ShardDone."""

    def __init__(self, shard: str):
        self.done = ShardDone(shard=shard, samples=0)
        self.images: list[np.ndarray] = []
        self.rows = row_columns()

    def add(self, result: Decoded | Failed | Skipped) -> None:
        if isinstance(result, Skipped):
            self.done.skipped[result.reason] = self.done.skipped.get(result.reason, 0) + 1
            return
        self.done.samples += 1
        self.done.decode_seconds += result.seconds
        if isinstance(result, Failed):
            self.done.failures.append(result.row)
            return
        self.done.near_constant += result.near_constant
        self.images.append(result.pixels)
        add_row(self.rows, result.row)

    def take_batch(self) -> Batch:
        batch = Batch(shard=self.done.shard, images=stack_nchw(self.images), rows=self.rows)
        self.images, self.rows = [], row_columns()
        return batch
