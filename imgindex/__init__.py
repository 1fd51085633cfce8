"""imgindex: image corpus -> embeddings (Parquet) -> FAISS index -> search and dedup.

The installed distribution claims this one import namespace. The repository keeps the
product's layout: `pipeline/` (images -> embeddings) installs as `imgindex.pipeline`,
`indexes/` (embeddings -> index, search, dedup) as `imgindex.indexes`, `configs/` as
`imgindex.configs`, and this folder holds the command line above both.
"""
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_SOURCE_TREE = Path(__file__).resolve().parent.parent
if (_SOURCE_TREE / "pyproject.toml").is_file() and (_SOURCE_TREE / "pipeline" / "__init__.py").is_file():
    # Imported from a clone (its root on sys.path, as when Python runs there), this folder would
    # shadow an installed imgindex while lacking the rooms the installed one maps in: make it the
    # whole package, as the editable install and the wheel do, so it never half-works.
    __path__.append(str(_SOURCE_TREE))

try:
    __version__ = version("imgindex")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
