"""The embeddings directory is read unchanged by embedding-reader (what autofaiss uses)."""
import json

import numpy as np
import pyarrow.parquet as pq
from embedding_reader import EmbeddingReader

from imgindex.pipeline.demo_corpus import write_tar
from imgindex.pipeline.job import run_embed


def test_embedding_reader_reads_parts_with_keys(tmp_path, photo_tars, photos, config_for):
    tars = [str(t) for t in photo_tars(count=3, per_shard=3)]
    broken = write_tar(tmp_path / "all-broken.tar", [("x.jpg", b"")])  # a shard with no rows at all
    out = tmp_path / "out"
    run_embed(tars + [str(broken)], str(out), config_for(), progress=False)
    assert json.loads((out / "_stats" / "part-all-broken.json").read_text())["rows"] == 0

    reader = EmbeddingReader(str(out / "embeddings"), file_format="parquet",
                             embedding_column="embedding", meta_columns=["shard", "key"])
    assert reader.count == 9 and reader.dimension == 128
    vectors, keys = [], []
    for data, meta in reader(batch_size=4, start=0, end=reader.count, show_progress=False):
        vectors.append(data)
        keys += list(zip(meta["shard"], meta["key"]))
    vectors = np.concatenate(vectors)
    direct = pq.read_table(out / "embeddings").to_pydict()
    by_key = dict(zip(zip(direct["shard"], direct["key"]), direct["embedding"]))
    assert len(keys) == len(set(keys)) == 9
    for key, vector in zip(keys, vectors):
        np.testing.assert_array_equal(vector, np.asarray(by_key[key], np.float32))
