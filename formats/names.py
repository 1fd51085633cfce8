"""Names as keys: every file or member name is its own key or a reversible escape of it, so
two names never share a key and a key always leads back to the exact name (`raw_name`). Part of
the on-disk contract: parts hold the keys, and every location written anywhere is built back
from them."""
from __future__ import annotations

import re

# A name that is not its own key: not UTF-8, or holding a backslash that could be read as an escape.
_AMBIGUOUS = re.compile(r"\\(?:\\|x[89a-f][0-9a-f])")
_ESCAPE = re.compile(r"\\(?:(\\)|x([89a-f][0-9a-f]))")


def text_key(name: str) -> tuple[str, bytes | None]:
    """A file or member name as a key, and the name's bytes when the key is not the name itself.

    A UTF-8 name is its own key, unless it holds `\\\\` or `\\xNN` (NN 80-ff) that could be read as an
    escape. Any other name (a Latin-1 name from an old archive, say, which Python decodes with
    surrogate escapes) is escaped: each backslash as `\\\\`, each byte that is not UTF-8 as `\\xNN`.
    So two names never share a key and `raw_name` gives back the exact name; the part keeps the
    bytes in `key_bytes` too."""
    try:
        name.encode("utf-8")
        if not _AMBIGUOUS.search(name):
            return name, None
    except UnicodeEncodeError:
        pass
    raw = name.encode("utf-8", "surrogateescape")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace"), raw


def printable(text: str) -> str:
    """Any string as valid UTF-8 text for JSON and HTML: a name that is not UTF-8 (held with
    surrogate escapes, as Python decodes it) shows its bytes as `\\xNN`, as its key does; any
    other lone surrogate its `\\uXXXX`."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text_key(text)[0]
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def raw_name(key: str) -> str:
    """The name a key came from (text_key undone; bytes that are not UTF-8 as Python's surrogate
    escapes, as os.fsdecode gives them)."""
    if not _AMBIGUOUS.search(key):
        return key
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) else chr(0xDC00 + int(m.group(2), 16)), key)
