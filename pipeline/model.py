"""The timm backbone: created with num_classes=0 (pooled features), weights from the hub,
a local checkpoint, a weights package (pipeline.weights) or (only when asked) random; forward on uint8 batches with the
normalization done on the device.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np
import timm
import torch
import torch.nn.functional as F

from imgindex.errors import ConfigError
from imgindex.pipeline.config import EmbedConfig
from imgindex.pipeline.weights import file_sha256, load_checkpoint, load_packaged

if TYPE_CHECKING:
    from imgindex.pipeline.schedule import Schedule

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Backbone:
    """A loaded model and everything needed to reproduce its embeddings."""

    model: torch.nn.Module
    name: str
    data_config: dict
    dim: int
    device: torch.device
    precision: str
    normalize: bool
    weights: dict = field(default_factory=dict)  # source, path, sha256 of the state dict

    def __post_init__(self) -> None:
        self.mean = torch.tensor(self.data_config["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(self.data_config["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """uint8 NCHW batch -> float32 features (L2-normalized when configured), on the host.

        The steps mirror timm's ToTensor (float, /255) and Normalize (sub mean, div std).
        """
        x = images.to(self.device, non_blocking=True).to(torch.float32).div_(255).sub_(self.mean).div_(self.std)
        with self._autocast():
            feats = self.model(x)
        feats = feats.float()
        if self.normalize:
            feats = F.normalize(feats, dim=-1)
        return feats.cpu().numpy()


def largest_fitting(fits: Callable[[int], bool], start: int = 8, limit: int = 2048,
                    headroom: float = 0.8) -> int:
    """Double a batch size from `start` while `fits(size)` holds; keep `headroom` of the largest
    that fitted, rounded down to a multiple of 8, as a margin for activations and fragmentation."""
    best, size = 0, start
    while size <= limit and fits(size):
        best, size = size, size * 2
    if not best:
        raise ConfigError(f"not even a batch of {start} fits in GPU memory: pass a smaller --batch-size")
    return max(8, int(best * headroom) // 8 * 8) if best >= 16 else best


def auto_batch_size(backbone: "Backbone") -> int:
    """On CUDA, the largest batch whose forward fits in memory (probed). Elsewhere the schedule
    has decided the batch (`schedule.CPU_BATCH`), so `auto` never reaches here."""
    if backbone.device.type != "cuda":
        raise ValueError(f"an auto batch size is probed on CUDA only, not on {backbone.device.type}")
    height, width = backbone.data_config["input_size"][1:]

    def fits(size: int) -> bool:
        try:
            backbone.embed(torch.zeros((size, 3, height, width), dtype=torch.uint8))
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    return largest_fitting(fits)


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Digest of the weights themselves, the same whether they came from the hub or a file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        arch = name.split(".")[0]
        near = timm.list_models(f"*{arch.split('_')[0]}*")[:5] if arch else []
        hint = f" (similar: {', '.join(near)})" if near else ""
        raise ConfigError(f"unknown timm model {name!r}{hint}: see timm.list_models()")


def _offline_weights(name: str) -> dict | None:
    """Before timm asks the hub: when the hub cannot be reached, the locally cached weights file
    (as a timm pretrained_cfg overlay), or an error at once, instead of a minute of retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = cfg.hf_hub_id if cfg is not None else None
    if not hub_id:
        return None  # weights by URL: timm's own download, with its own errors
    cached = next((path for path in (try_to_load_from_cache(hub_id, f) for f in HUB_FILES)
                   if isinstance(path, str)), None)
    if not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT):
        return None
    if cached:
        log.warning("the hub is not reachable: using the cached weights %s", cached)
        return {"file": cached}
    raise ConfigError(f"the model hub ({constants.ENDPOINT}) cannot be reached and {name!r} has no cached weights: "
                      "pass --checkpoint FILE with local weights (safetensors or .pth)")


HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_backbone(config: EmbedConfig, schedule: "Schedule | None" = None) -> Backbone:
    """Create the configured model, on the schedule's device and precision (default: the one
    `schedule.decide` makes for this machine; nothing is decided here). Never falls back:
    missing weights are an error."""
    mc = config.model
    _check_model_name(mc.name)
    if schedule is None:
        from imgindex.pipeline.schedule import decide, machine_facts

        schedule = decide(config.runtime, machine_facts())
    device, precision, compile_ = torch.device(schedule.device), schedule.precision, schedule.compile
    if mc.checkpoint:
        model = timm.create_model(mc.name, pretrained=False, num_classes=0)
        load_checkpoint(model, mc.checkpoint)
        weights = {"source": "checkpoint", "path": str(Path(mc.checkpoint).resolve()),
                   "file_sha256": file_sha256(Path(mc.checkpoint))}
    elif mc.weights_package:
        model = timm.create_model(mc.name, pretrained=False, num_classes=0)
        weights = load_packaged(model, mc.name, mc.weights_package)
    elif mc.pretrained:
        overlay = _offline_weights(mc.name)
        try:
            model = timm.create_model(mc.name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
        except Exception as exc:  # hub errors come as many types (OSError, HTTP, offline mode)
            raise ConfigError(
                f"could not load pretrained weights for {mc.name!r} ({type(exc).__name__}); offline? "
                "pass --checkpoint FILE with local weights (safetensors or .pth)"
            ) from None
        cfg = model.pretrained_cfg
        weights = {"source": "hub", "hf_hub_id": cfg.get("hf_hub_id"), "url": cfg.get("url")}
    else:
        torch.manual_seed(config.seed)
        model = timm.create_model(mc.name, pretrained=False, num_classes=0)
        weights = {"source": "random", "seed": config.seed}
        log.warning("model %s uses RANDOM weights (pretrained: false): its embeddings mean nothing", mc.name)
    model.eval()
    weights["sha256"] = state_dict_sha256(model)
    data_config = dict(timm.data.resolve_model_data_config(model))
    dim = int(model.num_features)
    model.to(device)
    if compile_:
        model = torch.compile(model)
    return Backbone(model=model, name=mc.name, data_config=data_config, dim=dim, device=device,
                    precision=precision, normalize=mc.normalize, weights=weights)
