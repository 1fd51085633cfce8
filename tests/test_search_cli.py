"""`imgindex build` and `python search.py` on real photos, through the command lines users run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from imgindex.pipeline.demo_corpus import photo_files

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("search")
    folder = root / "photos"
    folder.mkdir()
    for path in photo_files()[:10]:
        (folder / path.name).write_bytes(path.read_bytes())
    result = run("-m", "imgindex", "build", folder, "--out", root / "out", "--config", "test",
                 "--checkpoint", checkpoint, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "recall@10 vs exact search: 1.0000" in result.stdout
    return root


def test_an_image_from_the_corpus_finds_itself_first(built):
    query = built / "photos" / "coffee.png"
    result = run("search.py", "--image", query, "--index", built / "out" / "index", "--json", "-k", "3")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    answer = json.loads(line)
    top = answer["hits"][0]
    assert answer["query"] == str(query)
    assert top["key"] == "coffee.png" and top["shard"] == "photos-00000" and top["rank"] == 1
    assert top["score"] > 0.9999 and top["path"].endswith("photos/coffee.png")
    assert [h["rank"] for h in answer["hits"]] == [1, 2, 3]


def test_table_key_query_and_html_page(built):
    html = built / "results.html"
    result = run("search.py", "--key", "rocket.jpg", "--image", built / "photos" / "chelsea.png",
                 "--index", built / "out" / "index", "-k", "4", "--html", html)
    assert result.returncode == 0, result.stderr
    assert "query: key rocket.jpg" in result.stdout and "query: " + str(built / "photos" / "chelsea.png") in result.stdout
    table_rows = [line for line in result.stdout.splitlines() if line.strip().startswith("1 ")]
    assert any("rocket.jpg" in row for row in table_rows) and any("chelsea.png" in row for row in table_rows)
    page = html.read_text()
    assert page.count("<figure") == 2 * (1 + 4)
    json_out = run("search.py", "--key", "rocket.jpg", "--image", built / "photos" / "chelsea.png",
                   "--index", built / "out" / "index", "-k", "4", "--json")
    hits = {(h["shard"], h["key"]) for line in json_out.stdout.splitlines() for h in json.loads(line)["hits"]}
    # each distinct image inlined once, however often it is shown; a key query has no query image file
    assert page.count("data:image/jpeg;base64,") == 1 + len(hits)
    assert page.count('role="img"') == 2 * (1 + 4) - 1


@pytest.mark.parametrize("case", ["no_index", "not_an_image", "missing_image", "other_model", "corrupt", "nothing"])
def test_search_errors_exit_non_zero_with_one_line(built, tmp_path, case):
    index = built / "out" / "index"
    args = ["--image", built / "photos" / "coffee.png", "--index", index]
    if case == "no_index":
        args = ["--image", built / "photos" / "coffee.png", "--index", tmp_path / "none"]
    elif case == "not_an_image":
        (tmp_path / "q.png").write_text("not an image")
        args = ["--image", tmp_path / "q.png", "--index", index]
    elif case == "missing_image":
        args = ["--image", tmp_path / "nope.png", "--index", index]
    elif case == "other_model":
        args += ["--model", "xcit_large_24_p8_224.fb_in1k"]
    elif case == "corrupt":
        broken = tmp_path / "broken"
        broken.mkdir()
        for name in ("manifest.json", "ids.parquet"):
            (broken / name).write_bytes((index / name).read_bytes())
        (broken / "index.faiss").write_bytes((index / "index.faiss").read_bytes()[:100])
        args = ["--image", built / "photos" / "coffee.png", "--index", broken]
    elif case == "nothing":
        args = ["--index", index]
    result = run("search.py", *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("imgindex: error:"), result.stderr


def test_search_help_explains_itself():
    result = run("search.py", "--help")
    assert result.returncode == 0
    for flag in ("--image", "--dir", "--key", "-k", "--index", "--json", "--html"):
        assert flag in result.stdout
