"""`imgindex demo`, the README's first command, runs the pipeline on real photos and says so."""
import json

import pyarrow.parquet as pq

from imgindex.cli import main


def test_demo_embeds_real_photos_and_says_weights_are_random(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "--checkpoint" in printed
    assert "(1 failed)" in printed and "truncated=1" in printed
    manifest = json.loads((tmp_path / "vectors" / "_manifest.json").read_text())
    assert manifest["weights"]["source"] == "random"
    table = pq.read_table(tmp_path / "vectors" / "embeddings")
    assert table.num_rows >= 20
    assert set(table["shard"].to_pylist()) == {"demo-00000", "demo-00001"}
    # it goes on to index the vectors and query by image
    assert "recall@10 vs exact search: 1.0000" in printed
    assert "python search.py --image" in printed and "\n   1 " in printed
    assert (tmp_path / "index" / "index.faiss").is_file()
    assert "data:image/jpeg;base64," in (tmp_path / "search.html").read_text()


def test_demo_with_a_checkpoint_uses_it(tmp_path, capsys, checkpoint):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--workers", "0",
                 "--checkpoint", str(checkpoint)]) == 0
    assert "RANDOM" not in capsys.readouterr().out
    manifest = json.loads((tmp_path / "vectors" / "_manifest.json").read_text())
    assert manifest["weights"]["source"] == "checkpoint"
