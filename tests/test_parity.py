"""The stored embedding equals the model card's output for the same weights (CPU fp32)."""
import numpy as np
import pyarrow.parquet as pq
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from imgindex.pipeline.demo_corpus import photo_files
from imgindex.pipeline.job import run_embed

from conftest import MODEL


def model_card_embeddings(checkpoint, paths) -> dict[str, np.ndarray]:
    """The model card's snippet, with the weights read by timm itself from the same file."""
    model = timm.create_model(MODEL, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(checkpoint)))
    model = model.eval()
    data_config = timm.data.resolve_model_data_config(model)
    transforms = timm.data.create_transform(**data_config, is_training=False)
    out = {}
    with torch.no_grad():
        for path in paths:
            img = Image.open(path)
            if img.mode != "RGB":  # the card's snippet reads RGB photos
                continue
            out[path.name] = model(transforms(img).unsqueeze(0))[0]
    return out


def test_embeddings_match_model_card_within_1e_5(tmp_path, config_for, checkpoint):
    paths = photo_files()
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in paths:
        (folder / path.name).write_bytes(path.read_bytes())
    expected = model_card_embeddings(checkpoint, paths)
    assert len(expected) >= 6, "need several RGB photos to compare"
    refs = [F.normalize(v, dim=0).numpy() for v in expected.values()]
    # Random weights make all photos look alike; the check is only meaningful if they still
    # differ by far more than the tolerance.
    assert min(np.abs(a - b).max() for i, a in enumerate(refs) for b in refs[i + 1:]) > 1e-4

    run_embed([str(folder)], str(tmp_path / "out"), config_for(**{"runtime.batch_size": 5}), progress=False)
    table = pq.read_table(tmp_path / "out" / "embeddings").to_pydict()
    stored = dict(zip(table["key"], table["embedding"]))
    for name, reference in expected.items():
        reference = F.normalize(reference, dim=0).numpy()
        got = np.asarray(stored[name], dtype=np.float32)
        np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0, err_msg=name)
        assert abs(np.linalg.norm(got) - 1) < 1e-5


def test_unnormalized_embeddings_are_the_raw_pooled_features(tmp_path, config_for, checkpoint):
    path = next(p for p in photo_files() if p.name == "coffee.png")
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / path.name).write_bytes(path.read_bytes())
    expected = model_card_embeddings(checkpoint, [path])[path.name].numpy()
    run_embed([str(folder)], str(tmp_path / "out"), config_for(**{"model.normalize": False}), progress=False)
    got = np.asarray(pq.read_table(tmp_path / "out" / "embeddings")["embedding"][0].as_py(), np.float32)
    assert got.shape == (128,)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
