"""Configuration: the shipped production YAML matches the built-in defaults; typos are errors."""
import pytest
import yaml

from imgindex.errors import ConfigError
from imgindex.pipeline.config import CONFIG_DIR, EmbedConfig, load_config


def test_default_yaml_is_the_built_in_default():
    assert load_config(str(CONFIG_DIR / "default.yaml")) == EmbedConfig()
    assert EmbedConfig().model.name == "xcit_large_24_p8_224.fb_in1k"


def test_cpu_config_is_small_and_on_cpu():
    config = load_config("cpu")
    assert config.model.name.startswith("xcit_nano") and config.runtime.device == "cpu"


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"runtime": {"batch_size": 7, "workers": 1}}))
    config = load_config(str(path), {"runtime.batch_size": 3, "model.name": None})
    assert config.runtime.batch_size == 3 and config.runtime.workers == 1
    assert config.model.name == EmbedConfig().model.name


@pytest.mark.parametrize("text, message", [
    ("runtime: {batchsize: 3}", "unknown config key runtime.'batchsize'"),
    ("model: 3", "must be a mapping"),
    ("runtime: {precision: fp64}", "'fp64' is not allowed; use auto, fp32, bf16, fp16"),
    ("runtime: {workers: -1}", "-1 is not allowed; use a whole number from 0 to"),
    ("runtime: {workers: many}", "'many' is not allowed; use a whole number from 0 to"),
    ("runtime: {lanes: 0}", "0 is not allowed; use a whole number from 1 to"),
    ("source: {read_timeout_s: 0}", "source.read_timeout_s: 0 is not allowed; use a number of seconds above 0, or null"),
    ("[unclosed", "not valid YAML"),
    ("runtime: {batch_size: 8}\nruntime: {batch_size: 16}", "key 'runtime' appears twice"),
    ("runtime: {batch_size: 8, batch_size: 16}", "key 'batch_size' appears twice"),
    ("model: &m {name: x}\nruntime: *m", "aliases .* are not allowed"),
])
def test_bad_config_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", ".")):
        load_config(str(path))


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    """A few hundred bytes of nested aliases stand for 9^6 values here (9^10 and more are as
    short): refused as aliases, never expanded into an error line or memory."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcde", "bcdef"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(["model:", *(f"  {line}" for line in lines), "  name: *f"]) + "\n")
    assert len(path.read_bytes()) < 600
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert "aliases" in str(caught.value) and len(str(caught.value)) < 500


# Values each key must refuse (the fuzzed configs that ended in tracebacks or were accepted).
BAD_VALUES = {
    "model.name": [123, ["a"], "", None],
    "model.pretrained": ["no", 1, None],
    "model.checkpoint": [123, True, ""],
    "model.weights_package": [123, True, ""],
    "model.normalize": ["false", 0],
    "runtime.device": ["gpu", 3, "cuda:x"],
    "runtime.precision": ["fp64", None],
    "runtime.batch_size": [99999999999999999999, True, 0, -3, 2.5, "8"],
    "runtime.workers": [True, -1, 1.5, "many"],
    "runtime.lanes": [True, 0, "2"],
    "runtime.compile": ["yes", 1],
    "decode.max_pixels": ["big", 0, -1, 1.5, True],
    "decode.alpha_background": [None, 7, [999, -5, 3], [1, 2], "white", [1.5, 2, 3]],
    "decode.draft": [2, "true"],
    "source.folder_shard_size": ["10", None, 2.5, 0, True],
    "source.list_column": [3, "", None],
    "source.image_column": [3, "", True, ["image"]],
    "source.read_timeout_s": [0, -1, "60", True],
    "source.max_file_bytes": [0, -1, "1G", 1.5, True, None],
    "seed": ["abc", -1, 1.5, True, None],
}


def test_every_key_has_bad_values_in_this_test():
    from imgindex.pipeline.config import RULES

    assert set(BAD_VALUES) == set(RULES)


@pytest.mark.parametrize("dotted, value", [(k, v) for k, values in BAD_VALUES.items() for v in values])
def test_every_key_is_type_and_range_checked_from_yaml(tmp_path, dotted, value):
    *sections, key = dotted.split(".")
    nested = {key: value}
    for section in reversed(sections):
        nested = {section: nested}
    path = tmp_path / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(nested))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert "\n" not in message and f"config key {dotted}" in message and "is not allowed; use" in message


def test_a_config_that_is_not_utf8_is_one_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {name: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(path))


def test_a_config_extends_a_named_one_with_base(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: cpu\nruntime: {batch_size: 4}\n")
    config = load_config(str(path))
    assert config.model.name.startswith("xcit_nano") and config.runtime.device == "cpu"
    assert config.runtime.batch_size == 4
    child = tmp_path / "child.yaml"
    child.write_text("base: mine.yaml\ndecode: {draft: true}\n")  # a path, relative to the file naming it
    config = load_config(str(child))
    assert config.runtime.batch_size == 4 and config.decode.draft and config.model.name.startswith("xcit_nano")


def test_a_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "a.yaml"))


def test_named_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("test").model.pretrained is False
    with pytest.raises(ConfigError, match="one of: cpu, default, lite0, test"):
        load_config("nope")
