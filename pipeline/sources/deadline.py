"""A time limit on blocking reads (source.read_timeout_s)."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise TimeoutError (an OSError) in the block after `seconds`: a read stuck on a dead
    mount, a hung server or a FIFO fails instead of hanging the job. It uses SIGALRM, so it
    acts only in a process's main thread (decode worker processes, and the in-process loader
    on a CPU); elsewhere, and with no `seconds`, the block runs unbounded."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"no data after {seconds:g} s (source.read_timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
