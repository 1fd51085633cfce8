"""Every source layout users have: webdataset, img2dataset and GNU tars, folders, file lists."""
import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from imgindex.errors import ConfigError
from imgindex.pipeline.config import SourceConfig
from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar
from imgindex.pipeline.job import run_embed
from imgindex.pipeline.sources import plan_shards, read_shard


def keys_of(out) -> list[tuple[str, str]]:
    table = pq.read_table(out / "embeddings").to_pydict()
    return sorted(zip(table["shard"], table["key"]))


def test_webdataset_tarwriter_shard_with_sidecars(tmp_path, photos, config_for):
    path = tmp_path / "wds-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i, name in enumerate(["coffee", "chelsea", "rocket"]):
            sink.write({"__key__": f"sample{i:04d}", "jpg": jpeg_bytes(photos[name]), "txt": name,
                        "json": {"url": f"http://example.com/{name}.jpg"}})
    run_embed([str(path)], str(tmp_path / "out"), config_for(), progress=False)
    table = pq.read_table(tmp_path / "out" / "embeddings").to_pydict()
    assert table["key"] == ["sample0000", "sample0001", "sample0002"]
    assert table["caption"] == ["coffee", "chelsea", "rocket"]
    assert table["url"][1] == "http://example.com/chelsea.jpg"
    assert json.loads(table["json"][2])["url"].endswith("rocket.jpg")


def test_img2dataset_layout_with_glob(tmp_path, photos, config_for):
    corpus = tmp_path / "img2dataset"
    corpus.mkdir()
    for s, names in enumerate([["coffee", "astronaut"], ["chelsea"]]):
        members = []
        for i, name in enumerate(names):
            key = f"{s:05d}{i:04d}"
            meta = {"url": f"http://x/{name}", "key": key, "status": "success", "caption": name}
            members += [(f"{key}.jpg", jpeg_bytes(photos[name])), (f"{key}.txt", name.encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
        write_tar(corpus / f"{s:05d}.tar", members)
        pq.write_table(pa.table({"key": [f"{s:05d}0000"]}), corpus / f"{s:05d}.parquet")
        (corpus / f"{s:05d}_stats.json").write_text("{}")
    run_embed([str(corpus / "*.tar")], str(tmp_path / "out"), config_for(), progress=False)
    assert keys_of(tmp_path / "out") == [("00000", "000000000"), ("00000", "000000001"), ("00001", "000010000")]


def test_gnu_tar_with_members_in_sub_folders(tmp_path, photos, config_for):
    tree = tmp_path / "tree"
    (tree / "cats").mkdir(parents=True)
    (tree / "drinks" / "hot").mkdir(parents=True)
    (tree / "cats" / "Chelsea.JPG").write_bytes(jpeg_bytes(photos["chelsea"]))
    (tree / "drinks" / "hot" / "coffee.jpeg").write_bytes(jpeg_bytes(photos["coffee"]))
    subprocess.run(["tar", "-cf", str(tmp_path / "gnu.tar"), "-C", str(tree), "."], check=True)
    run_embed([str(tmp_path / "gnu.tar")], str(tmp_path / "out"), config_for(), progress=False)
    assert keys_of(tmp_path / "out") == [("gnu", "cats/Chelsea"), ("gnu", "drinks/hot/coffee")]


def test_brace_pattern_and_fsspec_url(tmp_path, photo_tars, config_for):
    photo_tars(count=3, per_shard=2)
    pattern = f"file://{tmp_path}/shard-{{00000..00001}}.tar"
    run_embed([pattern], str(tmp_path / "out"), config_for(), progress=False)
    assert {shard for shard, _ in keys_of(tmp_path / "out")} == {"shard-00000", "shard-00001"}


def test_folder_is_searched_recursively_in_any_extension_case(tmp_path, photos, config_for):
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    (root / "top.JPG").write_bytes(jpeg_bytes(photos["coffee"]))
    (root / "a" / "mid.Png").write_bytes(jpeg_bytes(photos["rocket"]))
    for i in range(4):
        (root / "a" / "b" / f"deep{i}.jpeg").write_bytes(jpeg_bytes(photos["chelsea"]))
    (root / "a" / "notes.txt").write_text("not an image")
    shards = plan_shards([str(root)], SourceConfig(folder_shard_size=4))
    assert [s.name for s in shards] == ["photos-00000", "photos-00001"]
    run_embed([str(root)], str(tmp_path / "out"), config_for(), progress=False)
    assert [k for _, k in keys_of(tmp_path / "out")] == [
        "a/b/deep0.jpeg", "a/b/deep1.jpeg", "a/b/deep2.jpeg", "a/b/deep3.jpeg", "a/mid.Png", "top.JPG"]


def test_text_and_parquet_file_lists(tmp_path, photos, config_for):
    (tmp_path / "imgs").mkdir()
    for name in ("coffee", "rocket"):
        (tmp_path / "imgs" / f"{name}.jpg").write_bytes(jpeg_bytes(photos[name]))
    (tmp_path / "list.txt").write_text("# my images\nimgs/coffee.jpg\n\nimgs/rocket.jpg\nimgs/missing.jpg\n")
    pq.write_table(pa.table({"path": [str(tmp_path / "imgs" / "rocket.jpg")], "caption": ["a rocket"]}),
                   tmp_path / "list.parquet")
    summary = run_embed([str(tmp_path / "list.txt"), str(tmp_path / "list.parquet")], str(tmp_path / "out"),
                        config_for(), progress=False)
    table = pq.read_table(tmp_path / "out" / "embeddings").to_pydict()
    assert sorted(table["key"]) == sorted(["imgs/coffee.jpg", "imgs/rocket.jpg", str(tmp_path / "imgs" / "rocket.jpg")])
    assert "a rocket" in table["caption"]
    failures = pq.read_table(tmp_path / "out" / "failures").to_pydict()
    assert failures["key"] == ["imgs/missing.jpg"] and failures["error"] == ["unreadable"]
    assert summary.failed == 1


def test_same_tar_name_in_two_folders_gets_distinct_shard_names(tmp_path, photos):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_tar(tmp_path / sub / "00000.tar", [("k.jpg", jpeg_bytes(photos["coffee"]))])
    shards = plan_shards([str(tmp_path / "a" / "00000.tar"), str(tmp_path / "b" / "00000.tar")], SourceConfig())
    names = [s.name for s in shards]
    assert len(set(names)) == 2 and all(n.startswith("00000-") for n in names)
    assert names == [s.name for s in plan_shards([str(tmp_path / "*" / "00000.tar")], SourceConfig())]


def test_samples_group_members_by_key_like_webdataset(tmp_path, photos):
    data = jpeg_bytes(photos["coffee"])
    tar = write_tar(tmp_path / "t.tar", [("x/a.jpg", data), ("x/a.txt", b"A"), ("x/a.b.json", b"{}"),
                                         ("b.png", data)])
    [shard] = plan_shards([str(tar)], SourceConfig())
    samples = list(read_shard(shard))
    assert [(s.key, s.member, s.caption) for s in samples] == [("x/a", "x/a.jpg", "A"), ("b", "b.png", None)]


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "nope.tar"), "does not exist"),
    (lambda p: str(p / "*.tar"), "matches no files"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no images"),
    (lambda p: (p / "shards").mkdir() or (p / "shards" / "a.tar").write_bytes(b"x") and str(p / "shards"),
     "holds tar shards, not images"),
    (lambda p: (p / "notes.csv").write_text("x") and str(p / "notes.csv"), "is not a tar shard"),
    (lambda p: (p / "empty.txt").write_text("\n") and str(p / "empty.txt"), "lists no images"),
])
def test_bad_sources_stop_the_plan_with_one_clear_line(tmp_path, make, message):
    with pytest.raises(ConfigError) as err:
        plan_shards([make(tmp_path)], SourceConfig())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_local_sources_are_recorded_as_normalized_paths(tmp_path):
    from imgindex.pipeline.config import SourceConfig
    from imgindex.pipeline.sources import plan_shards

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (shard,) = plan_shards([str(tmp_path / "elsewhere" / ".." / "photos")], SourceConfig())
    assert shard.url == f"file://{tmp_path}/photos" and ".." not in shard.files[0]
