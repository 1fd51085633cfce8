"""Embedding job configuration: built-in defaults <- YAML file <- command-line flags.

The defaults are the production setting (configs/default.yaml mirrors them). The resolved
config is written into the output manifest, so every run records exactly what it used.
"""
from __future__ import annotations

import argparse
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


def _optional_text(value: Any) -> bool:
    return value is None or _text(value)


def _device(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value) is not None


def _seconds_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9)


def _rgb(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_whole(0, 255)(v) for v in value)


def number_or_auto(text: str) -> int | str:
    """A flag's text -> a whole number, or `auto`."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def key(default: Any, check: Callable[[Any], bool], allowed: str, flag: str | None = None, **cli: Any) -> Any:
    """A config key, declared once: its default, its check and what it allows (said when refused),
    and the command-line flag that sets it (`cli`: the flag's help, metavar, parse or choices).
    The help may name the config's value as {value}: it is read only when help is shown."""
    kind = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(**kind, metadata={"check": check, "allowed": allowed, "flag": flag, "cli": cli})


@dataclass
class ModelConfig:
    name: str = key("xcit_large_24_p8_224.fb_in1k", _text, "a timm model name (text)", "--model", metavar="NAME",
                    help="timm model name (default {value}, from the {config} config)")
    pretrained: bool = key(True, _bool, "true or false")
    checkpoint: str | None = key(None, _optional_text, "a path to a safetensors or .pth file, or null", "--checkpoint",
                                 metavar="FILE", help="local weights (safetensors or .pth) instead of the hub")
    weights_package: str | None = key(None, _optional_text, "the name of a weights package, or null")  # pipeline/weights.py
    normalize: bool = key(True, _bool, "true or false")


@dataclass
class RuntimeConfig:
    device: str = key("auto", _device, "auto, cpu, cuda, cuda:N or mps", "--device", metavar="DEV",
                      help="auto (default), cpu, cuda or cuda:N")
    precision: str = key("auto", lambda v: v in PRECISIONS, ", ".join(PRECISIONS), "--precision", choices=PRECISIONS,
                         help="auto = bf16 autocast on CUDA, fp32 on CPU")
    batch_size: int | str = key("auto", _whole(1, MAX_BATCH, auto=True), f"a whole number from 1 to {MAX_BATCH}, or auto",
                                "--batch-size", parse=number_or_auto, metavar="N",
                                help="images per forward pass, or auto: the largest that fits in GPU memory (16 on "
                                     "a CPU)")
    workers: int | str = key("auto", _whole(0, MAX_PROCESSES, auto=True),
                             f"a whole number from 0 to {MAX_PROCESSES}, or auto", "--workers", parse=number_or_auto,
                             metavar="N", help="decode worker processes (0 = in-process threads), or auto: one per "
                                               "core less one, at most 16 (0 on a CPU device)")
    lanes: int | str = key("auto", _whole(1, MAX_PROCESSES, auto=True),
                           f"a whole number from 1 to {MAX_PROCESSES}, or auto", "--lanes", parse=number_or_auto,
                           metavar="N", help="CPU with --workers 0: N threads that each decode a batch and run the "
                                             "forward on it with their share of the cores, side by side; auto: one "
                                             "per core, at most 8 (1 elsewhere, and with --compile)")
    compile: bool = key(False, _bool, "true or false", "--compile", help="torch.compile the backbone")


@dataclass
class DecodeConfig:
    max_pixels: int = key(89_478_485, _whole(1), "a whole number of pixels, at least 1")
    alpha_background: tuple[int, int, int] = key((255, 255, 255), _rgb, "three whole numbers from 0 to 255 (R, G, B)")
    draft: bool = key(False, _bool, "true or false")  # JPEGs decoded at reduced size (faster; not the card's pixels)


@dataclass
class SourceConfig:
    folder_shard_size: int = key(10_000, _whole(1), "a whole number of images, at least 1")
    list_column: str = key("path", _text, "a column name (text)")
    # Parquet files holding images: the column of encoded bytes (null: detect it)
    image_column: str | None = key(None, _optional_text, "a column name (text), or null to detect it")
    # a file or tar member that takes longer is a failure, not a hang
    read_timeout_s: float | None = key(60.0, _seconds_or_null, "a number of seconds above 0, or null")
    # a larger file, tar member or Parquet cell is a `too_large` failure, never decoded
    max_file_bytes: int = key(2**30, _whole(1), "a whole number of bytes, at least 1")


@dataclass
class EmbedConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    seed: int = key(0, _whole(0, 2**63 - 1), "a whole number, 0 or more")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_keys(cls: type = EmbedConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every key of the config, dotted ("runtime.batch_size"), in declaration order."""
    keys: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        if "check" in f.metadata:
            keys[prefix + f.name] = f
        else:
            keys.update(config_keys(f.default_factory, f"{prefix}{f.name}."))
    return keys


# Derived from the declarations above. Checked when the config loads, before any work or write.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    dotted: (f.metadata["check"], f.metadata["allowed"]) for dotted, f in config_keys().items()}
# The keys that command-line flags set, so an error names the flag too.
FLAGS = {dotted: f.metadata["flag"] for dotted, f in config_keys().items() if f.metadata["flag"]}


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
