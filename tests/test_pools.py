"""The scheduling loop the pools share, on a simulated pool: the next shard to whoever is free,
bounded retries, shards only to workers that are ready, a worker that is never placed given up,
and a job no worker can take stopped with a clear error instead of a silent wait. And how many
Ray actors a cluster holds, counted per node."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from imgindex.errors import ConfigError
from imgindex.executors.handout import Event, NoWorkers, hand_out
from imgindex.executors.ray_actors import plan_actors

NEVER = None


@dataclass(frozen=True)
class Task:
    """Any task: the hand-out knows only its name."""

    name: str


class FakePool:
    """Workers in simulated time: ready `startup[w]` after they start (NEVER: not placed, given up
    `bound` later), `seconds[w]` per shard; they die or raise when told to, and die at start-up
    `die_starting[w]` times. A shard handed to a worker that is not ready is a bug it reports."""

    def __init__(self, seconds: list[float], die: set[tuple[int, str]] = frozenset(), fail: set[str] = frozenset(),
                 startup: dict[int, float | None] | None = None, restart_startup: dict[int, float | None] | None = None,
                 die_starting: dict[int, int] | None = None, bound: float = 100.0):
        self.seconds, self.die, self.fail, self.bound = seconds, set(die), set(fail), bound
        self.startup, self.restart_startup = startup or {}, restart_startup or {}
        self.die_starting = dict(die_starting or {})
        self.now, self.started, self.stopped = 0.0, [], None
        self.pending: dict[int, tuple[float, str]] = {}  # worker -> (when, ready | unplaced | died)
        self.running: dict[int, tuple[float, str]] = {}
        self.ready: set[int] = set()
        self.submitted: list[tuple[int, str]] = []

    def start(self, worker):
        delay = (self.restart_startup if worker in self.started else self.startup).get(worker, 0.0)
        self.started.append(worker)
        self.ready.discard(worker)
        if self.die_starting.get(worker, 0) > 0:
            self.die_starting[worker] -= 1
            self.pending[worker] = (self.now + 1.0, "died")
        elif delay is NEVER:
            self.pending[worker] = (self.now + self.bound, "unplaced")
        else:
            self.pending[worker] = (self.now + delay, "ready")

    def submit(self, worker, shard):
        assert worker in self.ready and worker not in self.running, f"{shard.name} to {worker}: not ready or busy"
        self.submitted.append((worker, shard.name))
        self.running[worker] = (self.now + self.seconds[worker], shard.name)

    def wait(self):
        moments = [(at, 0, w, what) for w, (at, what) in self.pending.items()]
        moments += [(at, 1, w, shard) for w, (at, shard) in self.running.items()]
        at, kind, worker, what = min(moments)
        self.now = at
        if kind == 0:
            del self.pending[worker]
            if what == "ready":
                self.ready.add(worker)
                return [Event("ready", worker)]
            return [Event(what, worker, error="model did not load" if what == "died" else "not placed")]
        del self.running[worker]
        shard = what
        if (worker, shard) in self.die:
            self.die.discard((worker, shard))
            self.ready.discard(worker)
            return [Event("died", worker, shard, error="killed")]
        if shard in self.fail:
            return [Event("failed", worker, shard, error="OSError: disk full")]
        return [Event("done", worker, shard, result={"shard": shard, "worker": worker})]

    def stop(self, now=False):
        self.stopped = "now" if now else "done"


def shards(count):
    return [Task(f"s{i:02d}") for i in range(count)]


def names(outcome):
    return sorted(s["shard"] for s in outcome.done)


def test_a_slow_worker_takes_fewer_shards():
    outcome = hand_out(FakePool([1.0, 5.0]), shards(12), workers=2, retries=2)
    taken = [s["worker"] for s in outcome.done]
    assert names(outcome) == [f"s{i:02d}" for i in range(12)]
    assert taken.count(0) >= 4 * taken.count(1)


def test_a_died_workers_shard_goes_to_another_and_the_worker_is_replaced():
    pool = FakePool([1.0, 1.0], die={(1, "s01")})
    outcome = hand_out(pool, shards(6), workers=2, retries=2)
    assert names(outcome) == [f"s{i:02d}" for i in range(6)]
    assert outcome.retried == 1 and outcome.restarts == 1 and pool.started == [0, 1, 1]
    assert not outcome.failed and pool.stopped == "done"


def test_a_shard_that_fails_every_attempt_is_named_and_the_rest_finish():
    pool = FakePool([1.0, 1.0], fail={"s02"})
    outcome = hand_out(pool, shards(5), workers=2, retries=2)
    assert outcome.failed == {"s02": "OSError: disk full"} and outcome.retried == 2
    assert names(outcome) == ["s00", "s01", "s03", "s04"]


def test_a_worker_gets_shards_only_once_it_is_ready():
    pool = FakePool([1.0, 1.0], startup={1: 3.5})
    outcome = hand_out(pool, shards(8), workers=2, retries=2)
    assert names(outcome) == [f"s{i:02d}" for i in range(8)]
    assert [s for w, s in pool.submitted if w == 0][:3] == ["s00", "s01", "s02"]  # worker 1 was still starting


def test_a_replacement_that_is_never_placed_does_not_hold_the_died_workers_shard():
    """The node-death hang: the replacement stays pending (no CPU left for it); the shard its
    predecessor held goes to the survivor, and the job ends without waiting for the replacement."""
    pool = FakePool([1.0, 1.0], die={(0, "s04")}, restart_startup={0: NEVER}, bound=1000.0)
    outcome = hand_out(pool, shards(6), workers=2, retries=2)
    assert names(outcome) == [f"s{i:02d}" for i in range(6)]
    assert pool.started == [0, 1, 0] and pool.submitted[-1] == (1, "s04")
    assert pool.now < 1000.0 and not outcome.given_up and pool.stopped == "done"


def test_a_worker_never_placed_is_given_up_and_the_others_finish():
    pool = FakePool([1.0, 1.0, 1.0], startup={2: NEVER}, bound=2.5)
    seen = []
    outcome = hand_out(pool, shards(9), workers=3, retries=2, on_event=lambda event, _: seen.append(event.kind))
    assert names(outcome) == [f"s{i:02d}" for i in range(9)]
    assert 2 not in {w for w, _ in pool.submitted} and pool.started.count(2) == 1
    assert outcome.given_up == {2: "not placed"} and "unplaced" in seen


def test_no_worker_placed_stops_the_job_with_a_clear_error_instead_of_waiting():
    pool = FakePool([1.0, 1.0], startup={0: NEVER, 1: NEVER})
    with pytest.raises(NoWorkers, match=r"left to take the 4 shards not done \(workers 0, 1: not placed\)"):
        hand_out(pool, shards(4), workers=2, retries=2)
    assert pool.stopped == "now" and not pool.submitted
    assert issubclass(NoWorkers, ConfigError)  # the command line's one-line error and exit status 2


def test_a_worker_that_dies_before_it_is_ready_is_restarted_a_bounded_number_of_times():
    pool = FakePool([1.0, 1.0], die_starting={1: 10})
    outcome = hand_out(pool, shards(6), workers=2, retries=2)
    assert names(outcome) == [f"s{i:02d}" for i in range(6)]
    assert pool.started.count(1) == 3 and "died 3 times before it was ready" in outcome.given_up[1]
    with pytest.raises(NoWorkers, match="died 3 times before it was ready: model did not load"):
        hand_out(FakePool([1.0], die_starting={0: 10}), shards(2), workers=1, retries=2)


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """One entry of ray.nodes(), as much of it as the count reads."""
    resources = {"CPU": float(cpus), "memory": 8e9, "node:10.0.0.1": 1.0}
    if gpus:
        resources["GPU"] = float(gpus)
    return {"Alive": alive, "Resources": resources if alive else {}}


@pytest.mark.parametrize("nodes, asked, on_gpu, expected", [
    ([node(1), node(1)], "auto", False, (2, 1, 2)),  # one actor per node, not cluster CPUs // driver cores
    ([node(1), node(1)], 3, False, (2, 1, 2)),  # capped at what the nodes hold
    ([node(1), node(1)], 2, False, (2, 1, 2)),
    ([node(4), node(4, alive=False)], "auto", False, (1, 4, 1)),  # a dead node holds nothing
    ([node(16), node(8)], "auto", False, (3, 8, 3)),
    ([node(8)], 2, False, (2, 4, 2)),  # two actors share one node's cores
    ([node(4), node(2)], 3, False, (3, 2, 3)),  # the largest equal share that still places all three
    ([node(0), node(2)], "auto", False, (1, 2, 1)),  # a head kept free of work (--num-cpus 0)
    ([node(0)], "auto", False, (0, 1, 0)),
    ([node(4), node(16, 8), node(16, 8)], "auto", True, (16, 2, 16)),  # one per GPU, a GPU's share of cores
    ([node(4), node(16, 8), node(16, 8)], 20, True, (16, 2, 16)),
    ([node(4)], "auto", True, (0, 1, 0)),
])
def test_ray_actors_are_counted_per_node_from_each_nodes_resources(nodes, asked, on_gpu, expected):
    plan = plan_actors(nodes, asked, on_gpu)
    assert (plan.count, plan.cpus, plan.holds) == expected
    assert plan.gpus == (1 if on_gpu else 0)
