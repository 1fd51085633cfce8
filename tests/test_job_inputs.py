"""A bad job input stops with one clear line and exit status 2, before any work starts."""
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "imgindex"]


def run_cli(*args, env=None):
    return subprocess.run(CLI + list(map(str, args)), capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("imgindex: error:"), result.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture
def one_tar(photo_tars):
    return photo_tars(count=1, per_shard=1)[0]


def test_missing_source(tmp_path, checkpoint):
    result = run_cli("embed", tmp_path / "nope.tar", "--out", tmp_path / "out", "--config", "test",
                     "--checkpoint", checkpoint)
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_empty_folder(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    result = run_cli("embed", tmp_path / "empty", "--out", tmp_path / "out", "--config", "test",
                     "--checkpoint", checkpoint)
    assert_one_line_error(result, "holds no images")


def test_unknown_model(tmp_path, one_tar):
    result = run_cli("embed", one_tar, "--out", tmp_path / "out", "--config", "test", "--model", "xcit_giant_99")
    assert_one_line_error(result, "unknown timm model", "xcit_giant_99")
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_unwritable_output(tmp_path, one_tar, checkpoint):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_cli("embed", one_tar, "--out", blocker / "out", "--config", "test", "--checkpoint", checkpoint)
    assert_one_line_error(result, "cannot write to output")


def test_offline_without_weights_says_how_to_pass_a_checkpoint(tmp_path, one_tar):
    result = run_cli("embed", one_tar, "--out", tmp_path / "out", "--config", "cpu",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")})
    assert_one_line_error(result, "--checkpoint")
    assert not (tmp_path / "out" / "embeddings").exists()


def test_checkpoint_for_another_architecture_is_refused(tmp_path, one_tar, checkpoint):
    result = run_cli("embed", one_tar, "--out", tmp_path / "out", "--config", "test",
                     "--model", "xcit_tiny_12_p16_224", "--checkpoint", checkpoint)
    assert_one_line_error(result, "does not fit", "size mismatch")


def test_checkpoint_with_missing_layers_is_refused(tmp_path, one_tar):
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("xcit_nano_12_p16_224", pretrained=False).state_dict()
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.11.")}, str(tmp_path / "partial.safetensors"))
    result = run_cli("embed", one_tar, "--out", tmp_path / "out", "--config", "test",
                     "--checkpoint", tmp_path / "partial.safetensors")
    assert_one_line_error(result, "does not fit", "missing keys", "blocks.11.")


def test_missing_checkpoint_file(tmp_path, one_tar):
    result = run_cli("embed", one_tar, "--out", tmp_path / "out", "--config", "test",
                     "--checkpoint", tmp_path / "nope.safetensors")
    assert_one_line_error(result, "does not exist")


def test_bad_flag_values(tmp_path, one_tar, checkpoint):
    assert_one_line_error(run_cli("embed", one_tar, "--out", tmp_path / "o", "--config", "test",
                                  "--batch-size", "0"), "--batch-size", "0 is not allowed")
    assert_one_line_error(run_cli("embed", one_tar, "--out", tmp_path / "o", "--config", "test",
                                  "--workers", "-2"), "--workers", "-2 is not allowed")
    unparsable = run_cli("embed", one_tar, "--out", tmp_path / "o", "--config", "test", "--workers", "all")
    assert unparsable.returncode == 2  # argparse's usage, then its one error line
    assert unparsable.stderr.splitlines()[-1].endswith("argument --workers: expected a whole number or auto, got 'all'")
    assert_one_line_error(run_cli("embed", one_tar, "--out", tmp_path / "o", "--config", "nope"), "config")
    assert_one_line_error(run_cli("embed", one_tar, "--out", tmp_path / "o", "--config", "test",
                                  "--checkpoint", checkpoint, "--slice", "3/2"), "slice")
    result = run_cli("embed", one_tar, "--out", tmp_path / "o", "--config", "test", "--device", "cuda")
    if "no CUDA GPU" in result.stderr:
        assert_one_line_error(result, "--device cpu")


def test_help_explains_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0 and "embed" in result.stdout and "demo" in result.stdout
    embed_help = run_cli("embed", "--help").stdout
    for flag in ("--out", "--model", "--checkpoint", "--batch-size", "--device", "--workers", "--config",
                 "--overwrite", "--slice"):
        assert flag in embed_help


def test_devices_this_machine_lacks_are_refused_by_the_schedule():
    from imgindex.errors import ConfigError
    from imgindex.pipeline.config import RuntimeConfig
    from imgindex.pipeline.schedule import Machine, decide

    with pytest.raises(ConfigError, match="no working MPS"):
        decide(RuntimeConfig(device="mps"), Machine(cores=4, gpus=0))
    assert decide(RuntimeConfig(device="mps"), Machine(cores=4, gpus=0, mps=True)).device == "mps"
    with pytest.raises(ConfigError, match=r"shows 2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"):
        decide(RuntimeConfig(device="cuda:2"), Machine(cores=4, gpus=2))
    assert decide(RuntimeConfig(device="cuda:1"), Machine(cores=4, gpus=2)).device == "cuda:1"


@pytest.mark.parametrize("flags, words", [
    (["--device", "mps"], ["mps", "--device cpu"]),
    (["--model", "xcit_giant_99"], ["unknown timm model"]),
    (["--checkpoint", "nope.safetensors"], ["does not exist"]),
])
def test_a_refused_embed_leaves_no_output_folder(tmp_path, one_tar, checkpoint, flags, words):
    flags = [str(tmp_path / f) if f.endswith(".safetensors") else f for f in flags]
    if "--checkpoint" not in flags:
        flags += ["--checkpoint", str(checkpoint)] if "--model" not in flags else []
    result = run_cli("embed", one_tar, "--out", tmp_path / "out", "--config", "test", *flags)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_embeddings(tmp_path_factory):
    from synthetic import clustered_vectors, write_embeddings_dir

    root = tmp_path_factory.mktemp("small")
    write_embeddings_dir(str(root / "emb"), clustered_vectors(240, 32, clusters=8, spread=1.0, seed=1),
                         shard_size=240)
    return root / "emb"


@pytest.mark.parametrize("flags, words", [
    (["--index-key", "IVF999999,Flat"], ["999,999 lists for 240 vectors", "--index-key"]),
    (["--index-key", "IVF4,PQ4"], ["cannot train", "--index-key"]),
    (["--index-key", "Bogus99"], ["not a valid faiss.index_factory string"]),
    (["--max-memory", "lots"], ["--max-memory", "not a size"]),
])
def test_a_refused_index_build_is_one_line_and_leaves_no_folder(tmp_path, small_embeddings, flags, words):
    result = run_cli("index", small_embeddings, "--out", tmp_path / "idx", *flags)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("args, words", [
    (["embed", "{tmp}/nope.tar", "--out", "{tmp}/out", "--config", "test"], ["does not exist"]),
    (["embed", "{tmp}", "--out", "{tmp}/out", "--config", "tset"], ["config 'tset' not found"]),
    (["search", "--image", "{tmp}/nope.png", "--index", "{tmp}"], ["query image", "does not exist"]),
    (["index", "{tmp}/no-embeddings", "--out", "{tmp}/idx"], ["no-embeddings"]),
])
def test_cheap_mistakes_are_caught_before_torch_is_imported(tmp_path, args, words):
    """A wrong path or config name answers at once: nothing heavy (torch, timm) is imported first."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    probe = ("import sys; from imgindex.cli import main; code = main(sys.argv[1:]); "
             "print('heavy' if 'torch' in sys.modules or 'timm' in sys.modules else 'light', code)")
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["light", "2"], result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.stderr
