"""Shards to a pool of workers, dynamically, with retries: the one scheduling loop that the local
process pool (`--procs`) and the Ray actor pool (`--ray`) share.

The next shard goes to whichever worker is free, so a slow or busy worker takes fewer. A
shard whose worker died (or raised) goes back in line, to any worker, up to `retries` more
times; a worker that died is replaced. A shard that fails every attempt is reported with its
error, and every other shard is still finished. Only shard descriptions and small status
records pass between the driver and the workers.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from imgindex.pipeline.sources import Shard


@dataclass
class Event:
    """What a pool reports: a shard `done` (with its stats), a shard that `failed` (raised), or a
    worker that `died` (with the shard it held, if any)."""

    kind: str
    worker: int
    shard: str | None = None
    stats: dict | None = None
    error: str | None = None


class Pool(Protocol):
    def start(self, worker: int) -> None: ...  # (re)start worker slot `worker`
    def submit(self, worker: int, shard: Shard) -> None: ...
    def wait(self) -> list[Event]: ...  # blocks until something happens
    def stop(self) -> None: ...


@dataclass
class Outcome:
    done: list[dict] = field(default_factory=list)  # stats of every shard finished
    failed: dict[str, str] = field(default_factory=dict)  # shard -> last error, after every attempt
    retried: int = 0
    restarts: int = 0
    alive: int = 0  # workers running now


def hand_out(pool: Pool, shards: list[Shard], workers: int, retries: int,
             on_event: Callable[[Event, Outcome], None] | None = None) -> Outcome:
    """Run every shard on the pool; returns what finished and what did not."""
    queue = deque(shards)
    by_name = {s.name: s for s in shards}
    attempts = {s.name: 0 for s in shards}
    holding: dict[int, str | None] = {}
    outcome = Outcome()
    alive: set[int] = set()
    try:
        for worker in range(min(workers, len(shards))):
            pool.start(worker)
            holding[worker] = None
            alive.add(worker)
        while queue or any(holding.values()):
            for worker, held in holding.items():
                if worker not in alive and queue:  # a worker that died: replaced while work is left
                    pool.start(worker)
                    alive.add(worker)
                    outcome.restarts += 1
                if worker in alive and held is None and queue:
                    shard = queue.popleft()
                    holding[worker] = shard.name
                    pool.submit(worker, shard)
            for event in pool.wait():
                shard = event.shard or holding.get(event.worker)
                if event.kind == "done":
                    holding[event.worker] = None
                    outcome.done.append(event.stats)
                elif event.kind in ("failed", "died"):
                    if holding.get(event.worker) == shard:
                        holding[event.worker] = None
                    if shard is not None:
                        attempts[shard] += 1
                        if attempts[shard] <= retries:
                            queue.append(by_name[shard])
                            outcome.retried += 1
                        else:
                            outcome.failed[shard] = event.error or "its worker died"
                    if event.kind == "died":
                        alive.discard(event.worker)
                outcome.alive = len(alive)
                if on_event:
                    on_event(event, outcome)
    finally:
        pool.stop()
    return outcome
