"""Which FAISS index to build, from the vector count, the dimension and a memory budget.

The rule, in the spirit of autofaiss, and explained in words in the index manifest:
- up to `flat_threshold` vectors: Flat (exact; brute force is fast at that size);
- else IVF with nlist ~ 4 sqrt(N) (a power of two, HNSW coarse quantizer from 16k lists; fewer
  when a training sample of 39 vectors a list would not fit the budget), and the finest codes that
  fit the budget: Flat (4d bytes a vector), SQ8 (d bytes), else PQ down to d/16 bytes; codes that
  fit nowhere are PQ of d/8 bytes with the inverted lists on disk (memory-mapped when searched).
IVF indexes memory-map, add without retraining and are tuned with one knob (nprobe).
"""
from __future__ import annotations

import math
import re

import faiss

from imgindex.errors import ConfigError

FLAT_THRESHOLD = 50_000
OVERHEAD = 1.1  # ids and list bookkeeping on top of the codes
MIN_TRAIN_PER_LIST = 39  # k-means training vectors a list below which faiss warns


def parse_memory(text: str, flag: str = "--max-memory") -> int:
    """'16G', '512MB', '1.5GiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"{flag} {text!r} is not a size: use e.g. 16G or 512M")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"


def choose_nlist(count: int) -> int:
    return int(min(2**18, max(64, 2 ** round(math.log2(4 * math.sqrt(count))))))


def max_lists(dim: int, max_memory: int) -> int:
    """The most IVF lists whose training sample (MIN_TRAIN_PER_LIST vectors a list) fits the budget."""
    return int(max_memory // (MIN_TRAIN_PER_LIST * dim * 4))


def disk_pq(dim: int) -> int:
    """PQ sub-quantizers of codes kept on disk: about dim / 8 bytes a vector (96 at 768 dims)."""
    return max((m for m in range(1, dim // 8 + 1) if dim % m == 0), default=1)


def choose_index_key(count: int, dim: int, max_memory: int,
                     flat_threshold: int = FLAT_THRESHOLD) -> tuple[str, str]:
    """(factory string, the reason in words). The number of lists is also held to what a training
    sample of MIN_TRAIN_PER_LIST vectors a list allows within the budget (fewer lists, said);
    codes that fit nowhere in the budget are PQ kept on disk (inverted lists memory-mapped)."""
    flat_bytes = count * dim * 4 * OVERHEAD
    if count <= flat_threshold and flat_bytes <= max_memory:
        return "Flat", (f"{count:,} vectors <= {flat_threshold:,}: exact search (Flat, {human(flat_bytes)})")
    nlist = choose_nlist(count)
    fewer = ""
    if nlist > max_lists(dim, max_memory):
        if max_lists(dim, max_memory) < 64:
            raise ConfigError(f"--max-memory {human(max_memory)} is too small to train an index of {dim} dims "
                              f"(64 lists x {MIN_TRAIN_PER_LIST} training vectors need "
                              f"{human(64 * MIN_TRAIN_PER_LIST * dim * 4)}): raise it")
        wanted, nlist = nlist, 2 ** int(math.log2(max_lists(dim, max_memory)))
        fewer = (f"; {nlist:,} lists instead of {wanted:,}, so that a training sample of {MIN_TRAIN_PER_LIST} "
                 f"vectors a list fits the {human(max_memory)} budget")
    ivf = f"IVF{nlist}_HNSW32" if nlist >= 16_384 else f"IVF{nlist}"
    for codes, per_vector in (("Flat", dim * 4), ("SQ8", dim)):
        need = count * per_vector * OVERHEAD
        if need <= max_memory:
            return f"{ivf},{codes}", (f"{count:,} vectors x {dim} dims: {ivf},{codes} needs {human(need)}, "
                                      f"within the {human(max_memory)} budget" + fewer)
    for m in sorted((m for m in range(max(8, dim // 16), dim // 2 + 1) if dim % m == 0), reverse=True):
        need = count * (m + 8) * OVERHEAD
        if need <= max_memory:
            return f"{ivf},PQ{m}", (f"{count:,} vectors x {dim} dims: full vectors need {human(flat_bytes)}; "
                                    f"{ivf},PQ{m} ({m} bytes a vector) fits the {human(max_memory)} budget" + fewer)
    m = disk_pq(dim)
    need = count * (m + 8) * OVERHEAD
    return f"{ivf},PQ{m}", (f"{count:,} vectors x {dim} dims: {ivf},PQ{m} needs {human(need)}, more than the "
                            f"{human(max_memory)} budget: its inverted lists go on disk (memory-mapped)" + fewer)


def codes_bytes(index: faiss.Index, count: int) -> int:
    """What `count` vectors take in the index's inverted lists (codes and ids); 0 for other types."""
    ivf = faiss.try_extract_index_ivf(index)
    return int(count * (ivf.code_size + 8) * OVERHEAD) if ivf is not None else 0


def search_knob(index: faiss.Index) -> str | None:
    """The parameter that trades speed for recall at search time, by index type."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return "efSearch"
    return None


def knob_values(index: faiss.Index, knob: str | None) -> list[int]:
    if knob == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        return [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v < nlist] + [nlist]
    if knob == "efSearch":
        return [16, 32, 64, 128, 256, 512, 1024]
    return []


def set_knob(index: faiss.Index, knob: str | None, value: int | None) -> None:
    if knob and value:
        faiss.ParameterSpace().set_index_parameter(index, knob, value)


def range_params(index: faiss.Index, start: int, end: int) -> faiss.SearchParameters:
    """Search parameters that keep only the rows [start, end), with the index's own search knob."""
    selector = faiss.IDSelectorRange(start, end)
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    else:
        params = faiss.SearchParameters(sel=selector)
    if isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform(index_params=params)
        outer.referenced_objects = [params, selector]
        return outer
    params.referenced_objects = [selector]
    return params
