"""IVF indexes larger than RAM: the sub-indexes merged by faiss's `merge_ondisk` into one
`index.ivfdata` file of inverted lists (faiss OnDiskInvertedLists) beside `index.faiss`, which
then holds only the quantizer and the lists' offsets. A search memory-maps the lists, so RAM holds
the quantizer and the pages the queries touch; the file is found beside the index wherever the
directory was moved (faiss's IO_FLAG_ONDISK_SAME_DIR).
"""
from __future__ import annotations

import faiss
from faiss.contrib.ondisk import merge_ondisk

from imgindex.errors import ConfigError
from imgindex.formats.index_dir import c_stdout_to_stderr
from imgindex.indexes.factory import codes_bytes, human


def choose_on_disk(index: faiss.Index, count: int, budget: int, mode: str) -> tuple[bool, str | None]:
    """(lists on disk?, the reason when they are): `always`, `never`, or `auto` = when the codes
    exceed the budget. Only IVF indexes have lists to put on disk."""
    ivf = faiss.try_extract_index_ivf(index)
    need = codes_bytes(index, count)
    if mode == "always":
        if ivf is None:
            raise ConfigError(f"--on-disk always needs an IVF index (inverted lists), not "
                              f"{faiss.downcast_index(index).__class__.__name__}: pick an IVF --index-key")
        if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQR):
            raise ConfigError("IVF...PQR indexes cannot keep their lists on disk: pick another --index-key")
        return True, "--on-disk always"
    if mode == "auto" and ivf is not None and need > budget:
        return True, (f"its inverted lists ({human(need)}) exceed --max-memory {human(budget)}: written to "
                      "index.ivfdata and memory-mapped")
    return False, None


def merge_to_disk(trained: faiss.Index, sub_paths: list[str], ivfdata_tmp: str, ivfdata_final: str) -> faiss.Index:
    """The trained (empty) index with every sub-index's lists merged into one file on disk; the
    index records `ivfdata_final` as its file (the caller renames the temporary one into place)."""
    index = faiss.clone_index(trained)
    with c_stdout_to_stderr():  # faiss prints the file's growth ("resizing ...") on stdout
        merge_ondisk(index, sub_paths, ivfdata_tmp)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    invlists.filename = ivfdata_final
    return index
