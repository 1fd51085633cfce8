"""Index build, --add and the query module, on synthetic vectors with planted neighbours."""
import json
import logging

import numpy as np
import pytest

from imgindex.indexes.build import BuildOptions, add_parts, build_index
from imgindex.indexes.factory import choose_index_key, parse_memory
from imgindex.indexes.query import Searcher
from synthetic import clustered_vectors, write_embeddings_dir
from imgindex.errors import ConfigError, Corrupt

IVF = BuildOptions(flat_threshold=1000, eval_queries=300)


@pytest.fixture(scope="module")
def corpus():
    return clustered_vectors(12_000, 64, clusters=200, spread=1.0, seed=3)


@pytest.fixture(scope="module")
def ivf_index(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("ivf")
    write_embeddings_dir(str(root / "emb"), corpus, shard_size=5_000)
    manifest = build_index(str(root / "emb"), str(root / "idx"), IVF, progress=False)
    return root, manifest


def test_automatic_choice_follows_count_and_memory_budget():
    assert choose_index_key(10_000, 768, parse_memory("16G"))[0] == "Flat"
    key, reason = choose_index_key(1_000_000, 768, parse_memory("16G"))
    assert key == "IVF4096,Flat" and "within the 16.0 GB budget" in reason
    assert choose_index_key(1_000_000, 768, parse_memory("1G"))[0] == "IVF4096,SQ8"
    key, reason = choose_index_key(100_000_000, 768, parse_memory("16G"))
    assert key.startswith("IVF32768_HNSW32,PQ") and "fits" in reason
    with pytest.raises(ConfigError, match="too small"):
        choose_index_key(100_000_000, 768, parse_memory("5M"))
    with pytest.raises(ConfigError, match="not a size"):
        parse_memory("lots")


def test_the_choice_at_1b_builds_with_lists_on_disk_and_enough_training_vectors_a_list():
    """Before: a 1B build was refused at the default budget, and trained 7.6 vectors a list."""
    from imgindex.indexes.build import _train_size
    from imgindex.indexes.factory import MIN_TRAIN_PER_LIST
    from imgindex.indexes.ondisk import choose_on_disk
    import faiss

    budget = parse_memory("16G")
    key, reason = choose_index_key(1_000_000_000, 768, budget)
    assert key == "IVF131072_HNSW32,PQ96" and "on disk" in reason
    index = faiss.index_factory(768, key, faiss.METRIC_INNER_PRODUCT)
    size, note = _train_size(index, 1_000_000_000, 768, budget, BuildOptions())
    assert size >= MIN_TRAIN_PER_LIST * 131072 and size * 768 * 4 <= budget and note is None
    assert choose_on_disk(index, 1_000_000_000, budget, "auto")[0]
    key, reason = choose_index_key(100_000_000, 768, parse_memory("100M"))  # fewer lists, said
    assert key == "IVF512,PQ96" and "512 lists instead of 32,768" in reason and "on disk" in reason


def test_build_measures_and_reaches_the_target_recall(ivf_index):
    root, manifest = ivf_index
    assert manifest.factory == "IVF512,Flat"
    assert manifest.recall_at_10 >= 0.95 and manifest.search_params["nprobe"] >= 1
    curve = manifest.recall_curve
    assert curve[-1]["nprobe"] == manifest.search_params["nprobe"] and curve[-1]["recall"] >= 0.95
    on_disk = json.loads((root / "idx" / "manifest.json").read_text())
    assert on_disk["count"] == 12_000 and on_disk["embeddings"]["dim"] == 64
    assert [p["rows"] for p in on_disk["parts"]] == [5000, 5000, 2000]
    assert set(on_disk["timings"]) >= {"train_s", "add_s", "ground_truth_s", "total_s"}


def test_measured_recall_is_honest(ivf_index, corpus):
    """Recompute recall@10 with the tuned nprobe by brute force: it matches the manifest's figure."""
    root, manifest = ivf_index
    searcher = Searcher(root / "idx")
    rng = np.random.default_rng(7)
    queries = rng.choice(len(corpus), 200, replace=False)
    exact = np.argsort(-(corpus[queries] @ corpus.T), axis=1)[:, 1:11]
    _, found = searcher.index.search(corpus[queries], 11)
    recall = np.mean([len(set(f[f != q][:10]) & set(e)) / 10 for f, e, q in zip(found, exact, queries)])
    assert abs(recall - manifest.recall_at_10) < 0.05


def test_perturbed_copy_finds_its_original_first(ivf_index, corpus):
    root, _ = ivf_index
    searcher = Searcher(root / "idx")
    rng = np.random.default_rng(1)
    rows = rng.choice(len(corpus), 50, replace=False)
    noisy = corpus[rows] + rng.standard_normal((50, 64)).astype(np.float32) * 0.01
    for row, hits in zip(rows, searcher.search_vectors(noisy, k=5)):
        assert hits[0].key == f"syn{row}" and hits[0].shard == f"syn-{row // 5000:05d}"
        assert hits[0].score > 0.99 and [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_add_appends_new_parts_without_retraining_and_ids_stay_right(tmp_path, corpus):
    write_embeddings_dir(str(tmp_path / "emb"), corpus[:8000], shard_size=4000)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), IVF, progress=False)
    write_embeddings_dir(str(tmp_path / "emb"), corpus[8000:], shard_size=4000, first_shard=2, prefix="new")
    manifest, added = add_parts(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    assert added == 4000 and manifest.count == 12_000
    assert manifest.adds[0]["drift_ratio"] < 1.5
    searcher = Searcher(tmp_path / "idx")
    ids = searcher.ids.to_pydict()  # the build's rows, then the --add's segment
    assert ids["key"][8000] == "new0" and ids["shard"][8000] == "new-00002" and len(ids["key"]) == 12_000
    for row in (0, 7999, 8000, 11_999):
        hit = searcher.search_vectors(corpus[row], k=1)[0][0]
        expected = f"syn{row}" if row < 8000 else f"new{row - 8000}"
        assert hit.key == expected and hit.score > 0.999
    assert add_parts(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)[1] == 0


def test_add_warns_when_new_data_drifts_from_the_training_sample(tmp_path, corpus, caplog):
    write_embeddings_dir(str(tmp_path / "emb"), corpus[:6000], shard_size=6000)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), IVF, progress=False)
    other = clustered_vectors(3000, 64, clusters=5, spread=3.0, seed=99)
    write_embeddings_dir(str(tmp_path / "emb"), other, shard_size=3000, first_shard=1, prefix="far")
    with caplog.at_level(logging.WARNING):
        manifest, _ = add_parts(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    assert manifest.adds[0]["drift_ratio"] > 1.5
    assert "drifted" in caplog.text


def test_flat_index_is_exact(tmp_path, corpus):
    write_embeddings_dir(str(tmp_path / "emb"), corpus[:3000], shard_size=1000)
    manifest = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    assert manifest.factory == "Flat" and manifest.recall_at_10 == 1.0 and manifest.search_params == {}


def test_any_factory_string_and_hnsw_tuning(tmp_path, corpus):
    write_embeddings_dir(str(tmp_path / "emb"), corpus[:4000], shard_size=4000)
    manifest = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"),
                           BuildOptions(index_key="HNSW16,Flat", eval_queries=200), progress=False)
    assert manifest.factory == "HNSW16,Flat" and "efSearch" in manifest.search_params
    assert manifest.recall_at_10 >= 0.95
    with pytest.raises(ConfigError, match="not a valid faiss.index_factory"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx2"), BuildOptions(index_key="IVFzz,Nope"))


def test_existing_index_is_not_replaced_without_overwrite(tmp_path, corpus):
    write_embeddings_dir(str(tmp_path / "emb"), corpus[:1000])
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    with pytest.raises(ConfigError, match="--overwrite"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    assert build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), overwrite=True, progress=False).count == 1000


def test_query_errors_are_clear(tmp_path, corpus, ivf_index):
    with pytest.raises(ConfigError, match="no index at"):
        Searcher(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not an index directory"):
        Searcher(tmp_path / "empty")
    root, _ = ivf_index
    with pytest.raises(ConfigError, match="built with synthetic, not xcit"):
        Searcher(root / "idx", model="xcit_large_24_p8_224.fb_in1k")
    with pytest.raises(ConfigError, match="dim 3"):
        Searcher(root / "idx").search_vectors(np.ones((1, 3), np.float32))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_index_file_is_a_clear_error(tmp_path, corpus, damage):
    write_embeddings_dir(str(tmp_path / "emb"), corpus[:2000])
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    path = tmp_path / "idx" / "index.faiss"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0garbage" * 100)
    with pytest.raises(Corrupt, match="corrupt or truncated"):
        Searcher(tmp_path / "idx")


def test_recall_counts_tied_neighbours_as_correct_and_wrong_ones_as_misses():
    from imgindex.indexes.recall import drop_self, exact_neighbors, recall_at_k

    def at(cosine, axis):  # a unit vector at this cosine to e0
        v = np.zeros(8, np.float32)
        v[0], v[axis] = cosine, np.sqrt(1 - cosine**2)
        return v

    far = [at(0.1, a) for a in range(4, 8)]
    vectors = np.stack([at(1.0, 1), at(0.9, 1), at(0.8, 2), at(0.7, 3), at(0.7, 3), *far])  # rows 3 and 4 tie
    exact = exact_neighbors(vectors[:1], [vectors], 4)
    query = np.array([0])
    truth = set(drop_self(exact.ids, query, 3)[0].tolist())
    assert {1, 2} < truth and len(truth & {3, 4}) == 1  # the tie sits at the 3rd place
    for third in (3, 4):
        assert recall_at_k(np.array([[0, 1, 2, third]]), exact, query, k=3) == 1.0
    assert recall_at_k(np.array([[0, 1, 2, 5]]), exact, query, k=3) == pytest.approx(2 / 3)


@pytest.mark.parametrize("damage", ["list", "no_embeddings_dir", "count_text", "parts_scalar"])
def test_a_damaged_manifest_is_one_line(tmp_path, corpus, damage):
    import json
    import subprocess
    import sys

    write_embeddings_dir(str(tmp_path / "emb"), corpus[:400], shard_size=400)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage == "list":
        manifest = []
    elif damage == "no_embeddings_dir":
        del manifest["embeddings_dir"]
    elif damage == "count_text":
        manifest["count"] = "400"
    else:
        manifest["parts"] = 3
    path.write_text(json.dumps(manifest))
    for command in (["search", "--key", "syn1"], ["dedup", "--dry-run"]):
        result = subprocess.run([sys.executable, "-m", "imgindex", *command, "--index", str(tmp_path / "idx")],
                                capture_output=True, text=True)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and "rebuild the index" in lines[0], result.stderr


def test_a_bit_flipped_index_is_refused_and_verify_checks_every_byte(tmp_path, corpus):
    import subprocess
    import sys

    write_embeddings_dir(str(tmp_path / "emb"), corpus[:3000], shard_size=1500)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), BuildOptions(flat_threshold=100, eval_queries=100),
                progress=False)
    ok = subprocess.run([sys.executable, "-m", "imgindex", "index", "--verify", str(tmp_path / "idx")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "5 index files and 2 parts match" in ok.stdout, ok.stderr
    path = tmp_path / "idx" / "index.faiss"
    raw = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for offset in rng.choice(np.arange(200, len(raw)), 2000, replace=False):
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(Corrupt, match="does not match the digest in its manifest"):
        Searcher(tmp_path / "idx")
    bad = subprocess.run([sys.executable, "-m", "imgindex", "index", "--verify", str(tmp_path / "idx")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not match the digest" in bad.stderr


def test_a_deleted_part_is_warned_about_once(tmp_path, corpus, caplog):
    write_embeddings_dir(str(tmp_path / "emb"), corpus[:600], shard_size=300)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    (tmp_path / "emb" / "embeddings" / "part-syn-00000.parquet").unlink()
    searcher = Searcher(tmp_path / "idx")
    with caplog.at_level("WARNING"):
        searcher.search_vectors(corpus[:5], k=10)
        searcher.search_vectors(corpus[:5], k=10)
    warnings = [r.getMessage() for r in caplog.records if "is missing" in r.getMessage()]
    assert len(warnings) == 1 and "syn-00000" in warnings[0]


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory, corpus):
    """Two Flat indexes of the same count and dim over different vectors."""
    root = tmp_path_factory.mktemp("pair")
    for name, vectors in (("a", corpus[:1000]), ("b", corpus[1000:2000])):
        write_embeddings_dir(str(root / f"emb-{name}"), vectors, shard_size=1000)
        build_index(str(root / f"emb-{name}"), str(root / f"idx-{name}"), progress=False)
    return root


@pytest.mark.parametrize("files", ["deleted", [1, 2], {}, {"index.faiss": "x", "ids.parquet": {}}])
def test_an_index_manifest_without_its_digests_is_refused(two_indexes, tmp_path, files):
    """Else another index's files of the same count load unchecked and answer wrongly."""
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(two_indexes / "idx-a", idx)
    shutil.copy(two_indexes / "idx-b" / "index.faiss", idx / "index.faiss")
    manifest = json.loads((idx / "manifest.json").read_text())
    if files == "deleted":
        del manifest["files"]
    else:
        manifest["files"] = files
    (idx / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="digests .* missing or malformed.*rebuild the index"):
        Searcher(idx)
    with pytest.raises(ConfigError, match="digests"):
        from imgindex.indexes.build import verify_index
        verify_index(str(idx))


def test_one_flipped_byte_of_a_small_index_is_caught_at_load(tmp_path):
    """Files small enough to hash whole in well under a second are hashed whole: a flip between
    the sampled digest's blocks is caught too."""
    from imgindex.formats.index_dir import SAMPLE_BLOCK, SAMPLE_BLOCKS

    vectors = clustered_vectors(40_000, 64, clusters=50, spread=1.0, seed=5)
    write_embeddings_dir(str(tmp_path / "emb"), vectors, shard_size=40_000)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    path = tmp_path / "idx" / "index.faiss"
    raw = bytearray(path.read_bytes())
    step = (len(raw) - SAMPLE_BLOCK) // (SAMPLE_BLOCKS + 1)
    assert step > 2 * SAMPLE_BLOCK  # so the sampled digest leaves gaps between its blocks
    raw[SAMPLE_BLOCK + 100] ^= 0x01  # in the gap after the first sampled block
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="does not match the digest"):
        Searcher(tmp_path / "idx")
