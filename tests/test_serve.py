"""`imgindex serve` as a real process on a loopback port: the JSON API answers what Searcher
answers, bad requests get a status and a message (one shape, never a 500) and the server keeps
serving, one query's failure is its own, every answer is JSON text, bodies are refused while they
are read, only indexed samples have thumbnails, the token is enforced, bad flags stop it at start,
16 clients at once get the one-by-one answers, and a headless browser uses the page and the docs."""
from __future__ import annotations

import io
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from imgindex.indexes.build import build_index  # noqa: E402
from imgindex.indexes.query import Searcher  # noqa: E402
from imgindex.pipeline.config import load_config  # noqa: E402
from imgindex.pipeline.demo_corpus import jpeg_bytes, write_tar  # noqa: E402
from imgindex.pipeline.job import run_embed  # noqa: E402
from imgindex.serve.batcher import Query, QueryBatcher  # noqa: E402

from conftest import huge_png_header  # noqa: E402

HOSTILE_KEY = "a<b>&'c"
HOSTILE_CAPTION = "<script>document.title='owned'</script><b>bold?</b>"
ROOT = Path(__file__).resolve().parent.parent


def unimplemented_dds() -> bytes:
    """A DDS header whose pixel format sets no flag Pillow implements: its plugin raises
    NotImplementedError (as for Pillow's own test file unimplemented_pfflags.dds)."""
    header = struct.pack("<3I", 0x1007, 4, 4) + bytes(120 - 12)
    return b"DDS " + struct.pack("<I", 124) + header + bytes(64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(index: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    output = tempfile.TemporaryFile("w+")  # not a pipe: a server that logs more than a pipe holds would block
    process = subprocess.Popen([sys.executable, "-m", "imgindex", "serve", "--index", str(index), "--port", str(port),
                                *extra], stdout=output, stderr=output, text=True)
    process.output = output
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            output.seek(0)
            raise AssertionError(output.read())
        try:
            headers = {"Authorization": f"Bearer {extra[extra.index('--token') + 1]}"} if "--token" in extra else {}
            if httpx.get(f"{url}/api/health", headers=headers, timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not come up")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    if hasattr(process, "output"):
        process.output.close()


def refused_at_start(index: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run `imgindex serve` expecting it to exit before it answers anything; fails if it serves."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "imgindex", "serve", "--index", str(index), "--port", str(port),
                                *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                stop(process)
                raise AssertionError(f"serve {' '.join(extra)} started and answers queries")
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    if process.poll() is None:
        stop(process)
        raise AssertionError(f"serve {' '.join(extra)} neither served nor exited")
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def sent_before_the_answer(url: str, path: str, content_type: str, chunks: Iterator[bytes]) -> tuple[int, int, dict]:
    """POST a chunked body until the server answers: (body bytes sent by then, status, JSON answer).
    A server that reads the whole body before refusing it answers only after the last chunk."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server answered and closed
                break
            sent += len(chunk)
        else:
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head, _, rest = answer.partition(b"\r\n\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        length = int(headers[b"content-length"])
        while len(rest) < length:
            rest += sock.recv(65536)
    return sent, int(head.split()[1]), json.loads(rest[:length])


def json_strings(value) -> Iterator[str]:
    """Every string in a decoded JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_strings(v)


@pytest.fixture(scope="module")
def index(tmp_path_factory, checkpoint, photos):
    root = tmp_path_factory.mktemp("serve")
    names = sorted(photos)[:10]
    members = []
    for name in names:
        members += [(f"{name}.jpg", jpeg_bytes(photos[name].resize((160, 120)))), (f"{name}.txt", name.encode())]
    members += [(f"{HOSTILE_KEY}.jpg", jpeg_bytes(photos[names[0]].rotate(90))),
                (f"{HOSTILE_KEY}.txt", HOSTILE_CAPTION.encode())]
    write_tar(root / "photos-00000.tar", members)
    extra = [(f"extra{i}.jpg", jpeg_bytes(photos[n].resize((100, 80)))) for i, n in enumerate(names[:4])]
    write_tar(root / "more-00000.tar", extra)
    config = load_config("test", {"model.checkpoint": str(checkpoint)})
    run_embed([str(root / "photos-00000.tar"), str(root / "more-00000.tar")], str(root / "emb"), config,
              progress=False)
    build_index(str(root / "emb"), str(root / "idx"), progress=False)
    return root, names


@pytest.fixture(scope="module")
def server(index):
    root, _ = index
    process, url = start(root / "idx", "--max-upload", "300K")
    yield url
    stop(process)


def same_hits(ours: list[dict], theirs) -> None:
    assert [(h["shard"], h["key"], h["rank"]) for h in ours] == [(h.shard, h.key, h.rank) for h in theirs]
    np.testing.assert_allclose([h["score"] for h in ours], [h.score for h in theirs], atol=1e-6)
    assert [h["caption"] for h in ours] == [h.caption for h in theirs]
    assert [h["path"] for h in ours] == [h.path for h in theirs]


def test_image_key_and_vector_queries_answer_what_searcher_answers(index, server, photos):
    from imgindex.open_index import open_searcher

    root, names = index
    searcher = open_searcher(root / "idx")
    photo = root / "query.png"
    photos[names[2]].resize((200, 150)).save(photo)
    raw = httpx.post(f"{server}/api/search/image?k=5", content=photo.read_bytes()).json()
    form = httpx.post(f"{server}/api/search/image?k=5", files={"file": ("q.png", photo.read_bytes())}).json()
    expected = searcher.search_images([photo], k=5)[0]
    same_hits(raw["hits"], expected)
    same_hits(form["hits"], expected)
    by_key = httpx.get(f"{server}/api/search/key", params={"key": names[1], "k": 4}).json()
    same_hits(by_key["hits"], searcher.search_keys([names[1]], k=4)[0])
    vector = searcher.key_vector(names[3])
    by_vector = httpx.post(f"{server}/api/search/vector", json={"vector": vector.tolist(), "k": 3}).json()
    same_hits(by_vector["hits"], searcher.search_vectors(vector, k=3)[0])
    within = httpx.get(f"{server}/api/search/key", params={"key": names[1], "k": 10, "within": "more-00000"}).json()
    assert {h["shard"] for h in within["hits"]} == {"more-00000"} and len(within["hits"]) == 4
    info = httpx.get(f"{server}/api/info").json()
    assert info["count"] == 15 and info["model"].startswith("xcit_nano") and info["weights"]["sha256"]


def test_thumbnails_only_of_indexed_samples(index, server):
    _, names = index
    good = httpx.get(f"{server}/api/thumbnail", params={"shard": "photos-00000", "key": names[0]})
    assert good.status_code == 200 and good.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(good.content)).size[0] <= 160
    for shard, key in (("photos-00000", "../../../../etc/passwd"), ("/etc", "passwd"), ("photos-00000", "nope")):
        refused = httpx.get(f"{server}/api/thumbnail", params={"shard": shard, "key": key})
        assert refused.status_code == 404 and "not an indexed sample" in refused.json()["error"]


def test_bad_requests_get_a_status_and_the_server_keeps_serving(index, server, photos):
    root, names = index
    good = jpeg_bytes(photos[names[0]].resize((64, 48)))
    cases = [
        ("post", "/api/search/image", {"content": b"this is not an image" * 10}, 422, "not_an_image"),
        ("post", "/api/search/image", {"content": good[: len(good) // 2]}, 422, "truncated"),
        ("post", "/api/search/image", {"content": huge_png_header()}, 413, "too_large"),
        ("post", "/api/search/image", {"content": os.urandom(400 * 1024)}, 413, "--max-upload"),
        ("post", "/api/search/image", {"content": b""}, 422, "empty upload"),
        ("post", "/api/search/image?k=0", {"content": good}, 422, "k must be"),
        ("get", "/api/search/key?key=nope", {}, 404, "not in the index"),
        ("get", f"/api/search/key?key={names[0]}&k=5000", {}, 422, "k must be"),
        ("get", f"/api/search/key?key={names[0]}&within=nope", {}, 404, "not in the index"),
        ("post", "/api/search/vector", {"json": {"vector": [1, 2, 3]}}, 422, "the vector must be"),
        ("post", "/api/search/vector", {"content": b"{broken"}, 422, "send JSON"),
    ]
    for method, path, kwargs, status, words in cases:
        response = getattr(httpx, method)(f"{server}{path}", timeout=30, **kwargs)
        assert response.status_code == status and words in response.json()["error"], (path, response.text)
        assert httpx.get(f"{server}/api/search/key", params={"key": names[0], "k": 2}).status_code == 200
    moved = root / "more-00000.tar"
    moved.rename(root / "moved.tar")
    try:
        gone = httpx.get(f"{server}/api/thumbnail", params={"shard": "more-00000", "key": "extra1"})
        assert gone.status_code == 404 and "cannot be read" in gone.json()["error"]
    finally:
        (root / "moved.tar").rename(moved)


def test_an_upload_no_decoder_reads_fails_alone_and_search_py_says_so_in_one_line(index, server, photos,
                                                                                    tmp_path):
    root, names = index
    good = jpeg_bytes(photos[names[1]].resize((120, 90)))
    alone = httpx.post(f"{server}/api/search/image?k=3", content=good, timeout=60).json()
    bodies = [good] * 12 + [unimplemented_dds()] + [good] * 12
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: httpx.post(f"{server}/api/search/image?k=3", content=body, timeout=120),
                                bodies * 2))
    bad = [a for a, body in zip(answers, bodies * 2) if body != good]
    assert [a.status_code for a in bad] == [422, 422]
    assert all("unsupported" in a.json()["error"] and "NotImplementedError" in a.json()["error"] for a in bad)
    together = [a.json()["hits"] for a in answers if a not in bad]
    assert len(together) == 48 and all(a.status_code == 200 for a in answers if a not in bad)
    for hits in together:  # batched forwards may round differently from a forward of one
        assert [(h["shard"], h["key"]) for h in hits] == [(h["shard"], h["key"]) for h in alone["hits"]]
        np.testing.assert_allclose([h["score"] for h in hits], [h["score"] for h in alone["hits"]], atol=1e-5)
    dds = tmp_path / "unimplemented_pfflags.dds"
    dds.write_bytes(unimplemented_dds())
    result = subprocess.run([sys.executable, str(ROOT / "search.py"), "--image", str(dds), "--index",
                             str(root / "idx")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "unsupported" in result.stderr and str(dds) in result.stderr


def test_a_search_that_fails_on_one_query_fails_only_that_query(index):
    root, names = index
    searcher = Searcher(root / "idx")

    class RefusesZeros:  # a Searcher whose search fails on one kind of query vector
        def __getattr__(self, name):
            return getattr(searcher, name)

        def search_vectors(self, vectors, k, shard=None):
            if not np.abs(vectors).sum(axis=1).all():
                raise ValueError("this search fails on a zero vector")
            return searcher.search_vectors(vectors, k, shard=shard)

    good = [searcher.key_vector(name) for name in names[:3]]
    batch = [Query(k=4, shard=None, vector=good[0]), Query(k=4, shard=None, vector=np.zeros_like(good[0])),
             Query(k=2, shard=None, vector=good[1]), Query(k=3, shard="more-00000", vector=good[2])]
    answers = QueryBatcher(RefusesZeros())._answer(batch)
    assert isinstance(answers[1], ValueError)
    for answer, query in zip([answers[0], answers[2], answers[3]], [batch[0], batch[2], batch[3]]):
        expected = searcher.search_vectors(query.vector, k=query.k, shard=query.shard)[0]
        assert answer == [h.to_dict() for h in expected]


@pytest.fixture(scope="module")
def latin1_server(tmp_path_factory, checkpoint, photos):
    """An image folder holding `caf\\xe9.jpg`, a name that is not UTF-8, served."""
    root = tmp_path_factory.mktemp("latin1")
    folder = root / "photos"
    folder.mkdir()
    names = sorted(photos)[:3]
    for name in names:
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photos[name].resize((96, 72))))
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    with open(latin1, "wb") as f:
        f.write(jpeg_bytes(photos[names[0]].resize((90, 70))))
    config = load_config("test", {"model.checkpoint": str(checkpoint)})
    run_embed([str(folder)], str(root / "emb"), config, progress=False)
    build_index(str(root / "emb"), str(root / "idx"), progress=False)
    process, url = start(root / "idx")
    yield url, folder, latin1
    stop(process)


def test_hits_whose_file_names_are_not_utf8_are_json_text(latin1_server):
    url, folder, latin1 = latin1_server
    key = "caf\\xe9.jpg"  # the key of a Latin-1 name: its bytes as \xNN
    by_key = httpx.get(f"{url}/api/search/key", params={"key": key, "k": 4})
    vector = Searcher(folder.parent / "idx").key_vector(key)
    by_vector = httpx.post(f"{url}/api/search/vector", json={"vector": vector.tolist(), "k": 4})
    with open(latin1, "rb") as f:
        by_image = httpx.post(f"{url}/api/search/image?k=4", content=f.read())
    for response in (by_key, by_vector, by_image):
        assert response.status_code == 200, response.text
        answer = json.loads(response.content.decode("utf-8"))  # strict UTF-8
        for text in json_strings(answer):
            text.encode("utf-8")  # no lone surrogate, escaped or not
        [hit] = [h for h in answer["hits"] if h["key"] == key]
        assert hit["path"] == f"{folder}/{key}"
    thumbnail = httpx.get(f"{url}/api/thumbnail", params={"shard": by_key.json()["hits"][0]["shard"], "key": key})
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"


def test_bodies_past_their_limit_are_refused_while_they_are_read(server):
    boundary = "b0undary"
    form_head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n").encode()

    def form() -> Iterator[bytes]:  # 256 MB of a form that never ends, against --max-upload 300K
        yield form_head
        for _ in range(4096):
            yield bytes(65536)

    def vector() -> Iterator[bytes]:  # 256 MB of one JSON vector, against a limit of some KB
        yield b'{"vector": ['
        for _ in range(4096):
            yield b"0.125, " * 9362

    for path, content_type, chunks, words in [
            ("/api/search/image", f"multipart/form-data; boundary={boundary}", form(), "--max-upload"),
            ("/api/search/image", "application/octet-stream", (bytes(65536) for _ in range(4096)), "--max-upload"),
            ("/api/search/vector", "application/json", vector(), "a vector query is at most")]:
        sent, status, answer = sent_before_the_answer(server, path, content_type, chunks)
        assert status == 413 and words in answer["error"], (path, status, answer)
        assert sent < 64 * 2**20, (path, sent)  # the limit, and what loopback socket buffers hold (up to 36 MB)
    vector_limit = httpx.post(f"{server}/api/search/vector", content=b"[" + b"0.5, " * 400_000 + b"0.5]")
    assert vector_limit.status_code == 413 and "a vector query is at most" in vector_limit.json()["error"]
    assert httpx.get(f"{server}/api/health").status_code == 200


def test_malformed_vector_queries_are_422_with_a_reason_never_500(index, server):
    root, names = index
    vector = Searcher(root / "idx").key_vector(names[0]).tolist()
    numbers = json.dumps(vector)
    cases = [
        (f'{{"vector": {numbers}, "k": 1e999}}'.encode(), "k must be"),
        *[(json.dumps({"vector": vector, "shard": shard}).encode(), "shard must be") for shard in (123, [1], {}, True)],
        (json.dumps({"vector": vector, "k": "5"}).encode(), "k must be"),
        (json.dumps({"vector": vector[:-1] + ["1"]}).encode(), "the vector must be"),
        (json.dumps({"vector": [1e300] * len(vector)}).encode(), "the vector must be"),
        (b"[1, 2]", "send JSON"), (b"true", "send JSON"), (b"{}", "the vector must be"), (b"null", "send JSON"),
        (b'{"vector": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "send JSON"),
    ]
    for body, words in cases:
        response = httpx.post(f"{server}/api/search/vector", content=body)
        assert response.status_code == 422 and words in response.json()["error"], (body[:80], response.text)
    deep = httpx.post(f"{server}/api/search/vector", content=b"[" * 100_000 + b"]" * 100_000)  # past the limit
    assert deep.status_code == 413 and "a vector query is at most" in deep.json()["error"]
    unknown = httpx.post(f"{server}/api/search/vector", json={"vector": vector, "shard": "nope"})
    assert unknown.status_code == 404 and "not in the index" in unknown.json()["error"]
    assert httpx.post(f"{server}/api/search/vector", json={"vector": vector, "k": 2}).status_code == 200


def test_every_refusal_has_one_shape_and_the_openapi_document_lists_bodies_and_refusals(index, server):
    _, names = index
    cases = [
        ("get", "/no/such/route", {}, 404, "no such route"),
        ("get", "/api/search/vector", {}, 405, "not allowed"),
        ("delete", "/api/health", {}, 405, "not allowed"),
        ("get", f"/api/search/key?key={names[0]}&k=abc", {}, 422, "k must be"),
        ("get", "/api/search/key", {}, 422, "key"),
        ("get", "/api/thumbnail?shard=photos-00000", {}, 422, "key"),
        ("post", "/api/search/image", {"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 422,
         "form"),
        ("post", "/api/search/image", {"files": {"other": ("q.png", b"x")}}, 422, "`file` field"),
    ]
    for method, path, kwargs, status, words in cases:
        response = httpx.request(method, f"{server}{path}", **kwargs)
        assert response.status_code == status and list(response.json()) == ["error"], (path, response.text)
        assert words in response.json()["error"], (path, response.text)
    spec = httpx.get(f"{server}/openapi.json").json()
    image, vector = spec["paths"]["/api/search/image"]["post"], spec["paths"]["/api/search/vector"]["post"]
    assert set(image["requestBody"]["content"]) == {"application/octet-stream", "multipart/form-data"}
    assert vector["requestBody"]["content"]["application/json"]["schema"]["properties"]["vector"]["minItems"] == 128
    for operation, codes in [(image, {"200", "400", "404", "413", "422"}), (vector, {"200", "404", "413", "422"}),
                             (spec["paths"]["/api/search/key"]["get"], {"200", "404", "422"})]:
        assert set(operation["responses"]) == codes
        for code in codes - {"200"}:
            assert operation["responses"][code]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]


def test_an_unusable_device_or_upload_limit_stops_serve_at_start(index):
    root, _ = index
    for flags, words in [(("--device", "gpu"), "gpu"), (("--max-upload", "0"), "--max-upload"),
                         (("--max-upload", "0.1"), "--max-upload")]:
        result = refused_at_start(root / "idx", *flags)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("imgindex: error:") and words in result.stderr


def test_sixteen_clients_at_once_get_the_one_by_one_answers(index, server):
    _, names = index
    keys = [names[i % len(names)] for i in range(48)]
    alone = [httpx.get(f"{server}/api/search/key", params={"key": key, "k": 5}).json() for key in keys]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda key: httpx.get(f"{server}/api/search/key", params={"key": key, "k": 5},
                                                       timeout=60).json(), keys))
    assert together == alone


def test_the_token_is_enforced_when_set(index):
    root, names = index
    process, url = start(root / "idx", "--token", "s3cret")
    try:
        assert httpx.get(f"{url}/api/info").status_code == 401
        assert httpx.get(f"{url}/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for scheme in ("bearer", "BEARER", "beaRer"):  # RFC 7235: the scheme is case-insensitive
            assert httpx.get(f"{url}/api/info", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        for header in ("s3cret", "Basic s3cret", "Bearers3cret"):  # the scheme is required
            refused = httpx.get(f"{url}/api/info", headers={"Authorization": header})
            assert refused.status_code == 401 and "bearer token" in refused.json()["error"], header
        assert httpx.get(f"{url}/api/thumbnail", params={"shard": "photos-00000", "key": names[0],
                                                         "token": "s3cret"}).status_code == 200
    finally:
        stop(process)


def test_a_browser_uploads_sees_thumbnails_follows_a_hit_and_hostile_text_stays_text(index, server, photos,
                                                                                     tmp_path):
    if os.environ.get("IMGINDEX_REQUIRE_BROWSER"):  # CI installs the browser: there it must run
        assert shutil.which("chromedriver"), "chromium-driver is not installed"
    webdriver = pytest.importorskip("selenium.webdriver")
    if not shutil.which("chromedriver"):
        pytest.skip("needs chromium and chromium-driver (Debian packages; .ci/run installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, names = index
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(f"{server}/?k=6")
        wait = WebDriverWait(browser, 60)
        photo = tmp_path / "upload.png"
        photos[names[4]].resize((180, 135)).save(photo)
        browser.find_element(By.ID, "file").send_keys(str(photo))

        def thumbnails_loaded(driver):
            return driver.execute_script(
                "return [...document.querySelectorAll('#hits figure img')]"
                ".filter(i => i.complete && i.naturalWidth > 0).length") >= 6

        wait.until(thumbnails_loaded)
        first = [f.get_attribute("data-key") for f in browser.find_elements(By.CSS_SELECTOR, "#hits figure")]
        assert len(first) == 6 and "hits for upload.png" in browser.find_element(By.ID, "status").text
        target = browser.find_elements(By.CSS_SELECTOR, "#hits figure")[-1]
        clicked = target.get_attribute("data-key")
        target.click()
        wait.until(lambda d: f"more like {clicked}" in d.find_element(By.ID, "status").text)
        wait.until(thumbnails_loaded)
        after = [f.get_attribute("data-key") for f in browser.find_elements(By.CSS_SELECTOR, "#hits figure")]
        assert after[0] == clicked and after != first  # the clicked image finds itself first
        assert f"key={clicked.replace(' ', '+')}" in browser.current_url or "key=" in browser.current_url
        browser.get(f"{server}/?key={HOSTILE_KEY.replace('&', '%26')}&k=15")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#hits figure")) == 15)
        texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#hits figcaption div")]
        assert HOSTILE_CAPTION in texts and HOSTILE_KEY in texts
        assert browser.title == "imgindex search"  # the caption's script never ran
        assert not browser.find_elements(By.CSS_SELECTOR, "#hits b:not(figcaption > b)")
        browser.get(f"{server}/docs")  # the API reference shows offline: nothing loaded from elsewhere
        wait.until(lambda d: d.find_elements(By.ID, "openapi"))
        listed = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "section h2")]
        assert {"POST /api/search/image", "GET /api/search/key", "POST /api/search/vector"} <= set(listed)
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(url.startswith(server) for url in loaded), loaded
        browser.find_element(By.ID, "openapi").click()
        wait.until(lambda d: '"openapi"' in d.find_element(By.TAG_NAME, "body").text)
    finally:
        browser.quit()
