"""The rooms import one way, as architecture.md says: every import of the package's own modules,
read from the source (also the ones inside functions), is checked against the allowed directions."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# room -> the rooms it may import (besides itself and the base modules below every room)
ALLOWED = {
    "executors": set(),
    "formats": set(),
    "pipeline": {"executors", "formats"},
    "indexes": {"executors", "formats"},
    "cli": {"executors", "formats", "pipeline", "indexes", "serve", "open_index"},
    "serve": {"executors", "formats", "pipeline", "indexes", "open_index"},
    "open_index": {"pipeline", "indexes"},
}
BASE = {"errors", "progress", "plurals", "configs", "__version__", ""}  # imgindex.errors, ..., and `imgindex` itself
FOLDERS = {"executors": "executors", "formats": "formats", "pipeline": "pipeline", "indexes": "indexes",
           "cli": "imgindex/cli", "serve": "imgindex/serve", "open_index": "imgindex/open_index.py"}


def own_imports(path: Path) -> set[str]:
    """The rooms of `imgindex.<room>...` that a file imports."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "imgindex":
                rooms.add(parts[1] if len(parts) > 1 else "")
    return rooms


def files_of(room: str) -> list[Path]:
    where = ROOT / FOLDERS[room]
    return [where] if where.is_file() else sorted(where.rglob("*.py"))


def test_every_room_imports_only_what_it_may():
    wrong = []
    for room, allowed in ALLOWED.items():
        for path in files_of(room):
            for other in own_imports(path) - allowed - BASE - {room}:
                wrong.append(f"{path.relative_to(ROOT)} imports imgindex.{other}")
    assert not wrong, "\n".join(wrong)


def test_the_base_modules_import_no_room():
    for name in ("errors", "progress", "plurals"):
        assert own_imports(ROOT / "imgindex" / f"{name}.py") <= {""}, name
