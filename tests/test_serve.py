"""`imgindex serve` as a real process on a loopback port: the JSON API answers what Searcher
answers, bad requests get a status and a message and the server keeps serving, only indexed
samples have thumbnails, the token is enforced, 16 clients at once get the one-by-one answers,
and a headless browser uses the page."""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
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

from conftest import huge_png_header  # noqa: E402

HOSTILE_KEY = "a<b>&'c"
HOSTILE_CAPTION = "<script>document.title='owned'</script><b>bold?</b>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(index: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "imgindex", "serve", "--index", str(index), "--port", str(port),
                                *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.stderr.read())
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
    root, names = index
    searcher = Searcher(root / "idx")
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
    finally:
        browser.quit()
