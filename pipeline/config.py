"""Embedding job configuration: built-in defaults <- YAML file <- command-line flags.

The defaults are the production setting (configs/default.yaml mirrors them). The resolved
config is written into the output manifest, so every run records exactly what it used.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A job input is wrong; the message says what to change."""


@dataclass
class ModelConfig:
    name: str = "xcit_large_24_p8_224.fb_in1k"
    pretrained: bool = True
    checkpoint: str | None = None
    normalize: bool = True


@dataclass
class RuntimeConfig:
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | str = "auto"  # or a number; auto: the largest that fits in GPU memory (16 on CPU)
    workers: int | str = "auto"  # or a number; auto: one decode process per core (max 16), 0 on a CPU device
    lanes: int | str = "auto"  # CPU, workers 0: batches decoded and embedded side by side; auto: one per core (max 8)
    compile: bool = False


@dataclass
class DecodeConfig:
    max_pixels: int = 89_478_485
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    draft: bool = False  # decode JPEGs at reduced size (faster; not the model card's exact pixels)


@dataclass
class SourceConfig:
    folder_shard_size: int = 10_000
    list_column: str = "path"
    read_timeout_s: float | None = 60.0  # a file or tar member that takes longer is a failure, not a hang


@dataclass
class EmbedConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of one in configs/ (`cpu` -> configs/cpu.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} not found: give a YAML file path or one of: {known}")


def _merge(target: Any, values: dict[str, Any], where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where or 'top level'} must be a mapping, got {values!r}")
    names = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {where}{key!r}; known keys: {', '.join(names)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{where}{key}.")
        elif isinstance(current, tuple):
            setattr(target, key, tuple(value))
        else:
            setattr(target, key, value)


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> EmbedConfig:
    """Defaults, then the YAML file, then dotted-key overrides such as {"runtime.batch_size": 8}."""
    config = EmbedConfig()
    if path:
        config_path = resolve_config_path(path)
        try:
            values = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {config_path} is not valid YAML: {exc}") from exc
        _merge(config, values, "")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *sections, key = dotted.split(".")
        nested: dict[str, Any] = {key: value}
        for section in reversed(sections):
            nested = {section: nested}
        _merge(config, nested, "")
    validate(config)
    return config


def validate(config: EmbedConfig) -> None:
    size = config.runtime.batch_size
    if size != "auto" and (not isinstance(size, int) or size < 1):
        raise ConfigError(f"batch size must be a whole number of at least 1, or auto; got {size!r}")
    workers = config.runtime.workers
    if workers != "auto" and (not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"workers must be a whole number of 0 or more, or auto; got {workers!r}")
    lanes = config.runtime.lanes
    if lanes != "auto" and (isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1):
        raise ConfigError(f"lanes must be a whole number of 1 or more, or auto; got {lanes!r}")
    check_lanes(lanes, config.runtime.device, workers, config.runtime.compile)  # again once `auto` is resolved
    if config.runtime.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {config.runtime.precision!r}")
    timeout = config.source.read_timeout_s
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(f"source.read_timeout_s must be a number of seconds above 0, or null; got {timeout!r}")
    if config.source.folder_shard_size < 1:
        raise ConfigError("source.folder_shard_size must be at least 1")
    if len(config.decode.alpha_background) != 3:
        raise ConfigError("decode.alpha_background must be three 0-255 values (R, G, B)")


def check_lanes(lanes: int | str, device: str, workers: int | str, compile_: bool) -> None:
    """Lanes decode and embed side by side on a CPU's cores: not with a GPU or decode processes,
    and not with torch.compile, which is not thread-safe (pytorch/pytorch#118260). An `auto`
    device or workers count is not known yet here and passes."""
    if lanes in ("auto", 1):
        return
    if device.startswith("cuda") or workers not in (0, "auto"):
        raise ConfigError(f"--lanes {lanes} needs a CPU device and --workers 0 (lanes decode and embed side by side "
                          f"on the CPU's cores): use --lanes 1 with {device} and {workers} workers")
    if compile_:
        raise ConfigError(f"--lanes {lanes} does not mix with --compile (a compiled model is not safe to run from "
                          "several threads): use --lanes 1")
