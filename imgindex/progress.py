"""Progress bars for every long step (tqdm), with one rule for when they show."""
from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, progress: bool | None, **options) -> tqdm:
    """`progress`: True shows the bar, False hides it, None shows it only on a terminal (tqdm's
    own rule), so logs of batch jobs stay free of bar redraws."""
    return tqdm(iterable, disable=None if progress is None else not progress, **options)
