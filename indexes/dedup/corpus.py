"""The rows a dedup compares: metadata columns and a disk-backed float32 copy of the vectors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgindex.errors import ConfigError
from imgindex.formats.embeddings_dir import EmbeddingsDir, Part
from imgindex.formats.records import part_schema
from imgindex.indexes.query import Searcher
from imgindex.progress import progress_bar


META_COLUMNS = ["shard", "key", "width", "height", "bytes", "grayscale", "sha256", "phash"]


BATCH = 8192


class Corpus:
    """Rows of some parts in order (all of them, or only `rows`: ascending row numbers across the
    parts): metadata columns and a float32 file of the normalized vectors. Blocks are read from
    the file (`blocks()`), single rows through a read-only memory map (`vectors[rows]`), so the
    process holds O(block) of the vectors, not O(N); with `rows`, parts holding none of them are
    not read at all, and only those rows' metadata is held."""

    def __init__(self, parts: list[tuple[EmbeddingsDir, Part]], dim: int, workdir: Path,
                 progress: bool | None = None, name: str = "vectors", rows: np.ndarray | None = None):
        count = sum(part.rows for _, part in parts)
        self.path, self.dim = workdir / f"{name}.f32", dim
        self.rows = rows  # the row numbers held, or None for all
        tables, start = [], 0
        bar = progress_bar(total=count if rows is None else len(rows), unit="vec", desc=f"read {name}",
                           progress=progress)
        with open(self.path, "wb") as out:
            for emb, part in parts:
                wanted = None if rows is None else rows[np.searchsorted(rows, start):
                                                         np.searchsorted(rows, start + part.rows)] - start
                start += part.rows
                if wanted is not None and not len(wanted):
                    continue
                read = 0
                for _, _, vectors in emb.iter_batches([part]):
                    batch = len(vectors)
                    if wanted is not None:
                        vectors = vectors[wanted[(wanted >= read) & (wanted < read + batch)] - read]
                    read += batch
                    out.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
                    bar.update(len(vectors))
                if read != part.rows:
                    raise ConfigError(f"the part of shard {part.shard} holds {read} rows, not the {part.rows} "
                                      "recorded: rebuild the index")
                meta = emb.read_columns(part.shard, META_COLUMNS)
                tables.append(meta if wanted is None else meta.take(wanted))
        bar.close()
        held = count if rows is None else len(rows)
        pa.default_memory_pool().release_unused()  # Parquet decoding leaves freed pages in the allocator
        self.vectors = (np.memmap(self.path, dtype=np.float32, mode="r", shape=(held, dim)) if held else
                        np.zeros((0, dim), np.float32))
        empty = pa.table({c: pa.array([], part_schema(dim).field(c).type) for c in META_COLUMNS})
        self.meta = (pa.concat_tables(tables) if tables else empty).combine_chunks()  # one chunk: fast take
        self.phash, self.phash_valid = hashes(self.meta["phash"])
        self.sha = self.meta["sha256"].combine_chunks()

    @classmethod
    def of_index(cls, searcher: Searcher, workdir: Path, progress: bool | None = None,
                 rows: np.ndarray | None = None, name: str = "vectors") -> "Corpus":
        """The index's rows in index order (all, or only `rows`), checked row by row against ids.parquet."""
        parts = []
        for part in searcher.manifest.parts:
            emb = searcher.embeddings_for(part.shard)
            if emb is None:
                raise ConfigError(f"the embeddings of shard {part['shard']} are gone: dedup reads the stored vectors")
            parts.append((emb, emb.part(part.shard, part.rows)))
        corpus = cls(parts, searcher.manifest.dim, workdir, progress, name, rows)
        ids = searcher.ids if rows is None else searcher.ids.take(rows)
        if not (corpus.meta["key"].equals(ids["key"]) and corpus.meta["shard"].equals(ids["shard"])):
            raise ConfigError("the embeddings changed since the index was built (rows do not line up with "
                              "ids.parquet): rebuild the index")
        return corpus

    def __len__(self) -> int:
        return len(self.vectors)

    def blocks(self, rows: int = BATCH):
        """The vectors in order, `rows` at a time, read (not mapped) from the file."""
        with open(self.path, "rb") as f:
            while block := f.read(rows * self.dim * 4):
                yield np.frombuffer(block, dtype=np.float32).reshape(-1, self.dim)


def hashes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """An int64 column with nulls -> (int64 values, validity); never through float64."""
    valid = np.asarray(pc.is_valid(column).combine_chunks().to_numpy(zero_copy_only=False), dtype=bool)
    values = pc.fill_null(column, 0).combine_chunks().to_numpy(zero_copy_only=False).astype(np.int64)
    return values, valid


def cosines(queries: Corpus, a: np.ndarray, db: Corpus, b: np.ndarray) -> np.ndarray:
    """Cosine of query row a[i] and db row b[i] on the stored full-precision vectors."""
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), BATCH):
        sl = slice(start, start + BATCH)
        out[sl] = np.einsum("ij,ij->i", queries.vectors[a[sl]], db.vectors[b[sl]])
    return out
