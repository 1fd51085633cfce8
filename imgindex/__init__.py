"""imgindex: image corpus -> embeddings (Parquet) -> FAISS index -> search and dedup.

The installed distribution claims this one import namespace. The repository keeps the
product's layout: `pipeline/` (images -> embeddings) installs as `imgindex.pipeline`,
`indexes/` (embeddings -> index, search, dedup) as `imgindex.indexes`, `configs/` as
`imgindex.configs`, and this folder holds the command line above both.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imgindex")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
