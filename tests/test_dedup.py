"""Dedup: planted groups on synthetic vectors, real-photo copies, the chaining guard,
keep policies, the leakage check and the report."""
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgindex.indexes.build import BuildOptions, build_index
from imgindex.indexes.dedup import DedupOptions, find_duplicates, find_leaks
from imgindex.indexes.dedup.tiers import phash_pairs
from imgindex.formats.embeddings_dir import normalize_rows
from imgindex.indexes.query import Searcher
from imgindex.indexes.dedup.review import write_dedup
from synthetic import clustered_vectors, write_embeddings_dir
from imgindex.errors import ConfigError
from imgindex.pipeline.demo_corpus import write_demo_corpus
from imgindex.pipeline.job import run_embed

EMBEDDING = DedupOptions(methods=("embedding",), threshold=0.95)


def planted(count=4000, dim=64, groups=150, seed=0):
    """Distinct vectors, then `groups` planted groups of 2-5 near copies (cosine ~0.999)."""
    rng = np.random.default_rng(seed)
    base = clustered_vectors(count, dim, clusters=50, spread=1.0, seed=seed)
    truth, extra = [], []
    row = count
    for g in range(groups):
        size = rng.integers(1, 5)
        members = [int(g * 7)]
        for _ in range(size):
            extra.append(base[g * 7] + rng.standard_normal(dim).astype(np.float32) * 0.1 / np.sqrt(dim))
            members.append(row)
            row += 1
        truth.append(frozenset(members))
    return normalize_rows(np.vstack([base, np.asarray(extra, np.float32)])), truth


def groups_as_sets(result, prefix="syn"):
    found = {}
    for gid, key in zip(result.groups["group_id"].to_pylist(), result.groups["key"].to_pylist()):
        found.setdefault(gid, set()).add(int(key[len(prefix):]))
    return {frozenset(v) for v in found.values()}


def brute_force_groups(vectors, threshold):
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, 0)
    label = np.arange(len(vectors))
    a, b = np.nonzero(sims >= threshold)
    for i, j in zip(a, b):  # tiny union-find, for the reference answer only
        ri, rj = label[i], label[j]
        while label[ri] != ri:
            ri = label[ri]
        while label[rj] != rj:
            rj = label[rj]
        label[max(ri, rj)] = min(ri, rj)
    roots = [r for r in range(len(vectors))]
    for i in range(len(vectors)):
        r = i
        while label[r] != r:
            r = label[r]
        roots[i] = r
    groups = {}
    for i, r in enumerate(roots):
        groups.setdefault(r, set()).add(i)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


@pytest.fixture(scope="module")
def planted_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    vectors, truth = planted()
    write_embeddings_dir(str(root / "emb"), vectors, shard_size=1500)
    build_index(str(root / "emb"), str(root / "idx"), BuildOptions(flat_threshold=1000, eval_queries=200),
                progress=False)
    return root, vectors, truth


def test_planted_groups_equal_brute_force_with_an_ivf_index(planted_index):
    root, vectors, truth = planted_index
    assert Searcher(root / "idx").manifest.factory.startswith("IVF")
    result = find_duplicates(root / "idx", EMBEDDING, progress=False)
    found = groups_as_sets(result)
    reference = brute_force_groups(vectors, 0.95)
    assert reference == set(truth)
    assert found == reference
    kinds = set(result.pairs["kind"].to_pylist())
    assert kinds == {"embedding"} and min(result.pairs["similarity"].to_pylist()) >= 0.95
    assert result.stats["removed"] == sum(len(g) - 1 for g in truth)
    search = result.stats["search"]
    assert search["knob"] == "nprobe" and search["planted_recall"] >= 0.99


def test_chains_are_split_around_the_kept_member(tmp_path):
    rng = np.random.default_rng(5)
    a = normalize_rows(rng.standard_normal((1, 32)).astype(np.float32))[0]
    step = normalize_rows(rng.standard_normal((1, 32)).astype(np.float32))[0]
    step -= (step @ a) * a
    step /= np.linalg.norm(step)
    angle = np.arccos(0.96)  # neighbours along the chain at cosine 0.96, ends at ~0.84
    chain = np.stack([np.cos(i * angle) * a + np.sin(i * angle) * step for i in range(4)]).astype(np.float32)
    others = clustered_vectors(200, 32, clusters=20, spread=1.0, seed=9)
    write_embeddings_dir(str(tmp_path / "emb"), np.vstack([chain, others]))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    result = find_duplicates(tmp_path / "idx", DedupOptions(methods=("embedding",), threshold=0.95, keep="first"), progress=False)
    assert groups_as_sets(result) == {frozenset({0, 1}), frozenset({2, 3})}
    for row in result.groups.to_pylist():
        assert row["min_similarity"] >= 0.95 and row["similarity"] >= 0.95


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, checkpoint):
    from imgindex.pipeline.config import load_config

    root = tmp_path_factory.mktemp("photos")
    shards = write_demo_corpus(root / "corpus")
    config = load_config("test", {"model.checkpoint": str(checkpoint)})
    run_embed([str(s) for s in shards], str(root / "emb"), config, progress=False)
    build_index(str(root / "emb"), str(root / "idx"), progress=False)
    return root, config


def test_copies_of_real_photos_are_grouped_and_distinct_photos_are_not(photo_index):
    root, _ = photo_index
    result = find_duplicates(root / "idx", DedupOptions(methods=("exact", "phash")), progress=False)
    groups = {}
    for row in result.groups.to_pylist():
        groups.setdefault(row["group_id"], {})[row["key"]] = row
    astronaut = next(g for g in groups.values() if "astronaut" in g)
    assert set(astronaut) == {"astronaut", "astronaut_exact_copy", "astronaut_reencoded", "astronaut_half_size"}
    assert astronaut["astronaut"]["keep"] and "largest: 512x512" in astronaut["astronaut"]["reason"]
    pairs = result.pairs.to_pylist()
    exact = [p for p in pairs if p["kind"] == "exact"]
    assert [(p["a_key"], p["b_key"]) for p in exact] == [("astronaut", "astronaut_exact_copy")]
    assert all(p["phash_distance"] <= 4 for p in pairs)
    grouped = {k for g in groups.values() for k in g}
    assert not grouped & {"coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "coins"}


@pytest.mark.parametrize("policy, kept", [("largest", "astronaut"), ("first", "astronaut"),
                                          ("smallest-file", "astronaut_half_size")])
def test_the_kept_member_follows_the_policy(photo_index, policy, kept):
    root, _ = photo_index
    result = find_duplicates(root / "idx", DedupOptions(methods=("exact", "phash"), keep=policy), progress=False)
    rows = [r for r in result.groups.to_pylist() if r["key"].startswith("astronaut")]
    assert [r["key"] for r in rows if r["keep"]] == [kept]


def test_outputs_and_report_reference_every_group_and_image(photo_index, tmp_path):
    root, _ = photo_index
    result = find_duplicates(root / "idx", DedupOptions(methods=("exact", "phash")), progress=False)
    write_dedup(result, Searcher(root / "idx"), tmp_path / "dedup")
    groups = pq.read_table(tmp_path / "dedup" / "groups.parquet").to_pylist()
    html = (tmp_path / "dedup" / "report.html").read_text().replace("<wbr>", "")  # break hints, not text
    for row in groups:
        assert row["key"] in html
    for gid in {r["group_id"] for r in groups}:
        assert f"group {gid}:" in html
    assert html.count("data:image/jpeg;base64,") == len(groups)
    keep = (tmp_path / "dedup" / "keep.txt").read_text().splitlines()
    remove = (tmp_path / "dedup" / "remove.txt").read_text().splitlines()
    assert len(keep) == len({r["group_id"] for r in groups}) and len(keep) + len(remove) == len(groups)
    assert all("#" in line and line.split("#")[0].endswith(".tar") for line in keep + remove)


def test_leakage_check_finds_a_planted_leak(photo_index, tmp_path, photos):
    from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar

    root, config = photo_index
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    test_tar = write_tar(tmp_path / "test-00000.tar", [
        ("leak.jpg", jpeg_bytes(photos["coffee"].resize((300, 200)), quality=70)),
        ("noise.jpg", jpeg_bytes(noise)),
    ])
    run_embed([str(test_tar)], str(tmp_path / "test_emb"), config, progress=False)
    result = find_leaks(root / "idx", str(tmp_path / "test_emb"), DedupOptions(methods=("exact", "phash")),
                        progress=False)
    leaks = {(p["a_key"], p["b_key"]) for p in result.pairs.to_pylist()}
    assert ("leak", "coffee") in leaks
    assert not any(a == "noise" for a, _ in leaks)
    assert result.stats["leaked"] == len({a for a, _ in leaks})


def test_leakage_on_embeddings_with_planted_near_copies(planted_index, tmp_path):
    root, vectors, _ = planted_index
    rng = np.random.default_rng(2)
    leak = normalize_rows(vectors[[10, 20]] + rng.standard_normal((2, 64)).astype(np.float32) * 0.005)
    fresh = clustered_vectors(5, 64, clusters=5, spread=1.0, seed=77)
    write_embeddings_dir(str(tmp_path / "test"), np.vstack([leak, fresh]), prefix="test")
    result = find_leaks(root / "idx", str(tmp_path / "test"), EMBEDDING, progress=False)
    assert {(p["a_key"], p["b_key"]) for p in result.pairs.to_pylist()} == {("test0", "syn10"), ("test1", "syn20")}
    assert result.stats == {**result.stats, "leaked": 2, "images": 7}


def test_phash_multi_index_hashing_is_exact_up_to_the_distance():
    rng = np.random.default_rng(0)
    values = rng.integers(-2**63, 2**63 - 1, 3000, dtype=np.int64)
    for bits in range(7):  # row 1000+bits differs from row bits in exactly `bits` bits
        mask = sum(1 << int(b) for b in rng.choice(64, bits, replace=False))
        values[1000 + bits] = np.int64(np.uint64(values[bits].view(np.uint64) ^ np.uint64(mask)).view(np.int64))
    q, db = phash_pairs((values, np.ones(len(values), bool)), 4)
    pairs = {(min(a, b), max(a, b)) for a, b in zip(q, db) if a != b}
    assert {(b, 1000 + b) for b in range(5)} <= pairs
    assert (5, 1005) not in pairs and (6, 1006) not in pairs


POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


@pytest.mark.parametrize("distance", [0, 4, 8, 10, 12, 16])
@pytest.mark.parametrize("tables", [0, 3, 5, 8])
def test_phash_pairs_are_exact_with_hash_tables_and_with_the_scan(monkeypatch, distance, tables):
    import imgindex.indexes.dedup.tiers as dedup

    rng = np.random.default_rng(distance)
    values = rng.integers(-2**63, 2**63 - 1, 1200, dtype=np.int64)
    unsigned = values.view(np.uint64)
    for i in range(60):  # planted neighbours at 0..distance+2 bits
        bits = rng.choice(64, i % (distance + 3), replace=False)
        unsigned[1000 + i] = unsigned[i] ^ np.uint64(sum(1 << int(b) for b in bits))
    monkeypatch.setattr(dedup, "phash_plan", lambda q, d, dist: (tables, 0.0))
    q, db = phash_pairs((values, np.ones(len(values), bool)), distance)
    found = {(min(a, b), max(a, b)) for a, b in zip(q, db) if a != b}
    xor = (unsigned[:, None] ^ unsigned[None, :]).view(np.uint8).reshape(len(values), len(values), 8)
    i, j = np.nonzero(np.triu(POPCOUNT[xor].sum(axis=2, dtype=np.int32) <= distance, 1))
    assert found == set(zip(i.tolist(), j.tolist())) and len(found) >= 60 * (distance + 1) // (distance + 3)


def test_phash_plan_hashes_small_distances_and_scans_large_ones():
    """Probing d + 1 - 8 flips of 8-bit tables (the old rule) compared 0.97 of all pairs' worth at
    d=10: slower than comparing all pairs. The plan never estimates above the scan."""
    from imgindex.indexes.dedup.tiers import SCAN_S, phash_plan

    for distance in range(17):
        tables, cost = phash_plan(100_000, 100_000, distance)
        assert cost <= 100_000 ** 2 * SCAN_S
        assert (tables > 0) == (distance <= 8)


def test_bad_options_are_clear_errors(planted_index):
    root, _, _ = planted_index
    for options, message in [(DedupOptions(methods=("pixels",)), "--method"),
                             (DedupOptions(keep="newest"), "--keep"),
                             (DedupOptions(threshold=1.5), "--threshold")]:
        with pytest.raises(ConfigError, match=message):
            find_duplicates(root / "idx", options)


def run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "imgindex", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_dedup_cli_writes_lists_and_dry_run_writes_nothing(photo_index, tmp_path):
    root, _ = photo_index
    dry = run_cli("dedup", "--index", root / "idx", "--out", tmp_path / "dry", "--method", "exact,phash",
                  "--dry-run", "--no-progress")
    assert dry.returncode == 0, dry.stderr
    assert "4 images to remove" in dry.stdout and "dry run: nothing written" in dry.stdout
    assert not (tmp_path / "dry").exists()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    real = run_cli("dedup", "--index", root / "idx", "--out", tmp_path / "dedup", "--method", "exact,phash",
                   "--no-progress")
    assert real.returncode == 0, real.stderr
    assert {p.name for p in (tmp_path / "dedup").iterdir()} >= {
        "pairs.parquet", "groups.parquet", "keep.txt", "remove.txt", "report.html"}
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}  # nothing deleted


def test_dedup_cli_errors_are_one_line(planted_index, tmp_path):
    root, _, _ = planted_index
    for args, word in [(["--method", "pixels"], "--method"), ([], "--out"),
                       (["--out", tmp_path / "o", "--against", tmp_path / "nope", "--threshold", "0.95"],
                        "not an embeddings directory"),
                       (["--out", tmp_path / "o"], "pass --threshold")]:  # auto needs a model to plant copies
        result = run_cli("dedup", "--index", root / "idx", *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and word in lines[0], result.stderr


def test_calibration_plants_copies_and_measures_each_tier(photo_index):
    from imgindex.indexes.dedup.calibrate import THRESHOLDS, TRANSFORMS, calibrate, format_table

    from imgindex.open_index import open_searcher

    root, _ = photo_index
    result = calibrate(open_searcher(root / "idx"), sample=8)
    assert result["images"] == 8 and result["copies"] == 8 * len(TRANSFORMS)
    assert [e["threshold"] for e in result["embedding"]] == list(THRESHOLDS)
    recalls = [e["recall"] for e in result["embedding"]]
    assert recalls == sorted(recalls, reverse=True)  # a higher threshold never finds more copies
    at4 = next(e for e in result["phash"] if e["distance"] == 4)
    # phash survives re-encoding and resizing, not mirroring (weights play no part here)
    assert at4["recall_jpeg_q50"] == 1.0 and at4["recall_resize_half"] >= 0.75 and at4["recall_flip"] <= 0.25
    assert "phash tier" in format_table(result)


def test_a_corpus_without_duplicates_gives_empty_tables(tmp_path):
    vectors = normalize_rows(np.random.default_rng(4).standard_normal((300, 32)).astype(np.float32))  # none alike
    write_embeddings_dir(str(tmp_path / "emb"), vectors, shard_size=300)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), progress=False)
    result = find_duplicates(tmp_path / "idx", DedupOptions(methods=("exact", "phash", "embedding"), threshold=0.99),
                             progress=False)
    assert result.pairs.num_rows == 0 and result.groups.num_rows == 0 and result.stats["removed"] == 0
