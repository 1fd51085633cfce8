"""Single images -> vectors, with exactly the model, weights and preprocessing an embeddings
manifest records: the image model the command line and the service compose a Searcher with
(indexes.query.ImageModel), to query an index by image and to calibrate dedup."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from imgindex.errors import ConfigError
from imgindex.formats.embeddings_dir import normalize_rows
from imgindex.formats.records import EmbeddingsManifest
from imgindex.pipeline.config import EmbedConfig, load_config
from imgindex.pipeline.decode import SampleError, build_preprocess, draft_side, open_upright, phash, stack_nchw
from imgindex.pipeline.model import load_backbone


def config_from_manifest(manifest: EmbeddingsManifest, device: str | None = None,
                         checkpoint: str | None = None) -> EmbedConfig:
    """The recorded config, with the runtime of this machine (device, precision)."""
    recorded = manifest.config
    if not recorded:
        raise ConfigError("the embeddings manifest records no model config (synthetic vectors?): "
                          "query by vector or key instead")
    overrides = {f"{section}.{k}": v for section in ("model", "decode", "source")
                 for k, v in recorded.get(section, {}).items()}
    overrides["seed"] = recorded.get("seed", 0)
    overrides["runtime.device"] = device or "auto"
    overrides["runtime.precision"] = "auto"
    overrides["runtime.workers"] = 0
    if checkpoint or manifest.weights_source == "checkpoint":
        overrides["model.checkpoint"] = checkpoint or manifest.weights.get("path")
        overrides.pop("model.weights_package", None)
    return load_config(None, overrides)


class ImageEmbedder:
    """Loads the recorded backbone once; refuses weights that differ from the recorded ones."""

    def __init__(self, manifest: EmbeddingsManifest, device: str | None = None, checkpoint: str | None = None):
        config = config_from_manifest(manifest, device, checkpoint)
        self.decode = config.decode
        self.backbone = load_backbone(config)
        recorded = manifest.weights_sha256
        if recorded and self.backbone.weights["sha256"] != recorded:
            raise ConfigError(
                f"the weights loaded for {config.model.name} ({self.backbone.weights.get('source')}) differ from "
                "those that made the index: pass --checkpoint with the original weights file")
        self.preprocess = build_preprocess(self.backbone.data_config)

    def embed_files(self, paths: list[str | Path], batch_size: int = 32) -> np.ndarray:
        """L2-normalized float32 vectors, one per file; an unreadable image is a ConfigError."""
        pixels = []
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read query image {path}: {exc.strerror or exc}") from None
            try:
                pixels.append(self.pixels(data))
            except SampleError as exc:
                raise ConfigError(f"query image {path} is unusable ({exc.kind}: {exc})") from None
        return self.embed_pixels(pixels, batch_size)

    def picture(self, data: bytes):
        """Encoded bytes -> the upright RGB image the job decodes (full size); SampleError."""
        return open_upright(data, self.decode.max_pixels, tuple(self.decode.alpha_background)).image

    @staticmethod
    def phash(picture) -> int:
        """The perceptual hash the parts record for a decoded picture."""
        return phash(picture)

    def pixels(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> the model's uint8 input, exactly as the job prepares it; SampleError if
        the bytes are no usable image."""
        img = open_upright(data, self.decode.max_pixels, tuple(self.decode.alpha_background),
                           draft_side(self.decode, self.backbone.data_config)).image
        return self.preprocess(img)

    def embed_pixels(self, pixels: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Model inputs -> vectors as the index holds them (normalized, for cosine), `batch_size` at
        a time."""
        out = [self.backbone.embed(stack_nchw(pixels[start:start + batch_size]))
               for start in range(0, len(pixels), batch_size)]
        vectors = np.concatenate(out)
        return vectors if self.backbone.normalize else normalize_rows(vectors)
