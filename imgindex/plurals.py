"""Counts in words, as every room prints them: "1 group", "2 groups", never "1 groups" or "group(s)"."""


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """`n` and the noun that fits it, with thousands separated ("1,204 images")."""
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"
