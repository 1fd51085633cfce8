"""An index directory on an S3-compatible store: built into `s3://`, searched through a local
copy, and checked against digests that catch a part replaced on the store. The store is moto's
server, started by the test on 127.0.0.1 (a port the OS picks), with its own made-up keys."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from synthetic import clustered_vectors, write_embeddings_dir

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

CLI = [sys.executable, "-m", "imgindex"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(environment for commands that reach the store, an s3fs filesystem on it); bucket `bucket`."""
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint,
               "IMGINDEX_CACHE": str(tmp_path_factory.mktemp("cache"))}
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
        fs.mkdir("bucket")
        yield env, fs
    finally:
        server.stop()


def test_an_index_built_into_s3_is_searched_and_a_replaced_remote_part_fails_verify(s3, tmp_path, monkeypatch):
    """Before: `--out s3://...` crashed (ArrowInvalid: Missing bucket name) and left ./s3:/...;
    --verify said remote parts matched whatever bytes they held (no digest was recorded)."""
    import os

    env, fs = s3
    vectors = clustered_vectors(3_000, 16, clusters=20, seed=4)
    local = tmp_path / "emb"
    write_embeddings_dir(str(local), vectors, shard_size=1_000)
    fs.put(str(local), "bucket/emb", recursive=True)
    monkeypatch.chdir(tmp_path)
    full_env = {**os.environ, **env}
    built = subprocess.run(CLI + ["index", "s3://bucket/emb", "--out", "s3://bucket/idx", "--index-key",
                                  "IVF16,Flat", "--procs", "2", "--no-progress"],
                           capture_output=True, text=True, env=full_env, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert not (tmp_path / "s3:").exists()  # nothing local named after the URL
    names = {p.rsplit("/", 1)[1] for p in fs.ls("bucket/idx")}
    assert {"index.faiss", "ids.parquet", "ids.arrow", "keys.arrow", "manifest.json"} <= names
    assert "_build" not in names
    manifest = json.loads(fs.cat_file("bucket/idx/manifest.json"))
    assert all(p["file"] and p["file"]["bytes"] > 0 for p in manifest["parts"])  # remote parts have digests

    found = subprocess.run(CLI + ["search", "--index", "s3://bucket/idx", "--key", "syn1234", "-k", "3", "--json"],
                           capture_output=True, text=True, env=full_env, timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    hits = json.loads(found.stdout.splitlines()[0])["hits"]
    assert hits[0]["key"] == "syn1234" and hits[0]["score"] > 0.999

    ok = subprocess.run(CLI + ["index", "--verify", "s3://bucket/idx"], capture_output=True, text=True,
                        env=full_env, timeout=300)
    assert ok.returncode == 0 and "3 parts match" in ok.stdout, ok.stderr[-3000:]
    other = tmp_path / "other"
    write_embeddings_dir(str(other), np.flip(vectors, axis=0).copy(), shard_size=1_000)  # same size, other bytes
    fs.put(str(other / "embeddings" / "part-syn-00001.parquet"), "bucket/emb/embeddings/part-syn-00001.parquet")
    bad = subprocess.run(CLI + ["index", "--verify", "s3://bucket/idx"], capture_output=True, text=True,
                         env=full_env, timeout=300)
    assert bad.returncode == 2 and "shard syn-00001" in bad.stderr and "changed since it was indexed" in bad.stderr


def test_a_thumbnail_of_a_tar_sample_on_s3_reads_its_member_alone(s3, tmp_path, monkeypatch):
    """Before: the tar was opened with s3fs's default 50 MB read-ahead block, so one thumbnail
    fetched the whole tar (up to 50 MB) instead of its member's bytes."""
    import io
    import tarfile

    import s3fs

    from imgindex.formats.samples import read_images

    env, fs = s3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    members = {f"s{i:03d}": np.random.default_rng(i).bytes(200_000) for i in range(8)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, data in members.items():
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fs.pipe_file("bucket/shards/a.tar", buffer.getvalue())
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        offsets = {m.name.split(".")[0]: (m.offset_data, m.size) for m in tar.getmembers()}

    fetched = []
    fetch = s3fs.core.S3File._fetch_range

    def counted(self, start, end):
        fetched.append(end - start)
        return fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    found = read_images("tar", "s3://bucket/shards/a.tar", ["s005"], ranges={"s005": offsets["s005"]})
    assert found == {"s005": members["s005"]}
    assert 0 < sum(fetched) <= 200_000 + 64 * 1024, fetched  # the member (a little read-ahead at most), not 1.6 MB


def test_add_to_an_index_on_s3_uploads_only_the_files_it_wrote(s3, tmp_path, monkeypatch):
    import s3fs

    from imgindex.indexes.build import BuildOptions, add_parts, build_index
    from imgindex.indexes.query import Searcher

    env, fs = s3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    vectors = clustered_vectors(3_000, 16, clusters=20, seed=5)
    write_embeddings_dir(str(tmp_path / "emb"), vectors[:2_000], shard_size=1_000)
    build_index(str(tmp_path / "emb"), "s3://bucket/added", BuildOptions(index_key="IVF16,Flat", on_disk="always"),
                progress=False)
    write_embeddings_dir(str(tmp_path / "emb"), vectors[2_000:], shard_size=1_000, first_shard=2, prefix="new")
    uploaded = []
    put = s3fs.S3FileSystem._put_file  # the coroutine behind put_file (mirrored on each instance)

    async def counted(self, local, remote, *args, **kwargs):
        if "/_build/" not in remote:  # the index's files (the build's scratch files are uploaded too)
            uploaded.append(remote.rsplit("/", 1)[1])
        return await put(self, local, remote, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", counted)
    s3fs.S3FileSystem.clear_instance_cache()  # instances made from now on mirror the counted one
    manifest, added = add_parts(str(tmp_path / "emb"), "s3://bucket/added", progress=False)
    assert added == 1_000 and manifest.count == 3_000
    assert sorted(uploaded) == sorted(["ids.1.arrow", "keys.1.arrow", "lists.1.ilod", "lists.1.ivfdata",
                                       "recall.1.npz", "manifest.json"])
    assert not fs.exists("bucket/added/recall.npz")  # the replaced recall set is gone from the store
    monkeypatch.setenv("IMGINDEX_CACHE", str(tmp_path / "fresh"))  # a searcher with nothing cached
    hit = Searcher("s3://bucket/added").search_vectors(vectors[2_500], k=1)[0][0]
    assert (hit.shard, hit.key) == ("new-00002", "new500")


def test_a_sub_index_goes_to_the_store_and_back_streamed(s3):
    """A remote BuildDir spools a file locally and uploads it in one put (no BytesIO of the whole
    file), and reads an index back through a block reader: both on a real S3 API. (Their memory
    is measured in test_index_parallel, on a filesystem that is not local: the server here runs in
    this process, so its own copies would be counted.)"""
    from imgindex.formats.index_dir import BuildDir
    from test_index_parallel import _sub_index

    _, fs = s3
    index, queries, codes = _sub_index()
    build = BuildDir("s3://bucket/streamed/_build")
    build.fs = fs  # the test's store (its endpoint and keys)
    build.write_index("add-00000.faiss", index)
    assert fs.info("bucket/streamed/_build/add-00000.faiss")["size"] > codes
    assert not fs.ls("bucket/streamed/_build")[1:]  # one object, no temporary one left beside it
    back = build.read_index("add-00000.faiss")
    index.nprobe = back.nprobe = 8
    assert np.array_equal(back.search(queries, 5)[1], index.search(queries, 5)[1])
