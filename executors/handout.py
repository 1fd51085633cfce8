"""Tasks to a pool of workers, dynamically, with retries: the one scheduling loop that every pool
shares (this process, `--procs`, `--ray`), for every kind of task (embedding a shard, adding parts
to an index, a dedup partition). Below, a "shard" is any task: a picklable value with a unique
`name`.

A worker is handed a shard only once it reported itself ready (it was placed and holds its
model), so a shard never waits on a worker that may never start. The next shard goes to
whichever ready worker is free, so a slow or busy worker takes fewer. A shard whose worker died
(or raised) goes back in line, to any worker, up to `retries` more times; a worker that died is
replaced. A worker the pool could not place in time, or that died before it was ready more than
`retries` times in a row, is given up; when no worker is left the job stops with a clear error
instead of waiting. A shard that fails every attempt is reported with its error, and every other
shard is still finished. Only shard descriptions and small status records pass between the
driver and the workers.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from imgindex.errors import ConfigError


class Task(Protocol):
    """Anything picklable with a unique name: a shard, a group of parts, a partition."""

    name: str


class TaskWorker(Protocol):
    """What a pool's factory makes, once per worker slot: it runs tasks for its whole life."""

    def run(self, task: Task, progress: Callable[[int, int], None] | None = None) -> Any: ...
    def close(self) -> None: ...


class WorkerFactory(Protocol):
    """Picklable: called in the worker's own process with its slot and a name for its records."""

    def __call__(self, slot: int, name: str) -> TaskWorker: ...


@dataclass
class Event:
    """What a pool reports: a worker `ready` for shards, a shard `done` (with its result), a shard
    that `failed` (raised), a worker that `died` (with the shard it held, if any), or a worker
    that was `unplaced` (not started within the pool's bound; the pool has given up on it)."""

    kind: str
    worker: int
    shard: str | None = None
    result: Any = None
    error: str | None = None


class NoWorkers(ConfigError):
    """Every worker slot was given up (never placed, or died before it was ready): nothing can
    take the shards left, so the job stops and says why rather than waiting."""


class Pool(Protocol):
    reports_progress: bool  # its worker calls `progress` (an attribute then) as a task runs: the local pool
    def start(self, worker: int) -> None: ...  # (re)start slot `worker`; it reports `ready` when it can take shards
    def submit(self, worker: int, shard: Task) -> None: ...  # only ever to a ready, free worker
    def wait(self) -> list[Event]: ...  # what happened; may return [] after a short tick
    def stop(self, now: bool = False) -> None: ...  # now: the job was interrupted, end the workers at once


@dataclass
class Outcome:
    done: list = field(default_factory=list)  # the result of every shard finished
    failed: dict[str, str] = field(default_factory=dict)  # shard -> last error, after every attempt
    retried: int = 0
    restarts: int = 0
    alive: int = 0  # workers ready now
    given_up: dict[int, str] = field(default_factory=dict)  # worker slot -> why it is not restarted


def hand_out(pool: Pool, shards: list[Task], workers: int, retries: int,
             on_event: Callable[[Event, Outcome], None] | None = None) -> Outcome:
    """Run every shard on the pool; returns what finished and what did not. Raises NoWorkers when
    shards are left and no worker can take them."""
    queue = deque(shards)
    by_name = {s.name: s for s in shards}
    attempts = {s.name: 0 for s in shards}
    holding: dict[int, str | None] = {}
    ready: set[int] = set()
    starting: set[int] = set()
    early_deaths: dict[int, int] = {}  # deaths before ready, in a row, per slot
    outcome = Outcome()
    try:
        for worker in range(min(workers, len(shards))):
            pool.start(worker)
            holding[worker] = None
            starting.add(worker)
            early_deaths[worker] = 0
        while queue or any(holding.values()):
            for worker, held in holding.items():
                if queue and worker not in ready | starting and worker not in outcome.given_up:
                    pool.start(worker)  # a worker that died: replaced while work is left
                    starting.add(worker)
                    outcome.restarts += 1
                if queue and worker in ready and held is None:
                    shard = queue.popleft()
                    holding[worker] = shard.name
                    pool.submit(worker, shard)
            if not ready and not starting:
                raise NoWorkers(f"no worker is left to take the {len(queue)} shards not done "
                                f"({_reasons(outcome.given_up)}); rerun the same command to finish them once "
                                "workers can start")
            for event in pool.wait():
                worker = event.worker
                shard = event.shard or holding.get(worker)
                if event.kind == "died":
                    event.shard = shard  # the shard it held, for whoever reports the death
                if event.kind == "ready":
                    if worker in starting:
                        starting.discard(worker)
                        ready.add(worker)
                        early_deaths[worker] = 0
                elif event.kind == "done":
                    holding[worker] = None
                    outcome.done.append(event.result)
                elif event.kind in ("failed", "died", "unplaced"):
                    if holding.get(worker) == shard:
                        holding[worker] = None
                    if shard is not None:
                        attempts[shard] += 1
                        if attempts[shard] <= retries:
                            queue.append(by_name[shard])
                            outcome.retried += 1
                        else:
                            outcome.failed[shard] = event.error or "its worker died"
                    if event.kind == "died" and worker in starting:
                        early_deaths[worker] += 1
                        if early_deaths[worker] > retries:
                            outcome.given_up[worker] = (f"died {early_deaths[worker]} times before it was ready: "
                                                        f"{event.error}")
                    if event.kind == "unplaced":
                        outcome.given_up[worker] = event.error or "not placed"
                    if event.kind in ("died", "unplaced"):
                        ready.discard(worker)
                        starting.discard(worker)
                outcome.alive = len(ready)
                if on_event:
                    on_event(event, outcome)
    except BaseException:
        pool.stop(now=True)  # interrupted (Ctrl-C) or stuck: the workers' shards are abandoned, not awaited
        raise
    pool.stop()
    return outcome


def _reasons(given_up: dict[int, str]) -> str:
    """'workers 0, 1: why; worker 2: why else': one entry per distinct reason."""
    slots: dict[str, list[int]] = {}
    for worker, why in sorted(given_up.items()):
        slots.setdefault(why, []).append(worker)
    return "; ".join(f"{'workers' if len(ws) > 1 else 'worker'} {', '.join(map(str, ws))}: {why}"
                     for why, ws in slots.items())
