"""Configuration: the shipped production YAML matches the built-in defaults; typos are errors."""
import pytest
import yaml

from pipeline.config import CONFIG_DIR, ConfigError, EmbedConfig, load_config


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
    ("runtime: {precision: fp64}", "precision must be one of"),
    ("runtime: {workers: -1}", "workers must be a whole number of 0 or more, or auto"),
    ("runtime: {workers: many}", "workers must be a whole number of 0 or more, or auto"),
    ("runtime: {lanes: 0}", "lanes must be a whole number of 1 or more, or auto"),
    ("source: {read_timeout_s: 0}", "read_timeout_s must be a number of seconds above 0, or null"),
    ("[unclosed", "not valid YAML"),
])
def test_bad_config_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", ".")):
        load_config(str(path))
