"""The pool of one slot in this process: the in-process executor, on the same hand-out loop as
the others. Its worker runs each task when the loop waits, with the driver's progress callback
(so a bar moves inside a task), and an error in a task stops the run at once, as any error in
this process does: there is no other worker to give it to.
"""
from __future__ import annotations

from collections.abc import Callable

from imgindex.executors.handout import Event, Task, TaskWorker, WorkerFactory


class LocalPool:
    reports_progress = True  # tasks report their progress as they run, not only when done

    def __init__(self, factory: WorkerFactory, name: str = "local",
                 progress: Callable[[int, int], None] | None = None):
        self.factory, self.name, self.progress = factory, name, progress
        self.worker: TaskWorker | None = None
        self.pending: list[Event] = []
        self.task: Task | None = None

    def open(self) -> TaskWorker:
        """The slot's worker, made now if it is not yet (the driver may need it before the tasks)."""
        if self.worker is None:
            self.worker = self.factory(0, self.name)
        return self.worker

    def start(self, worker: int) -> None:
        self.open()
        self.pending.append(Event("ready", worker))

    def submit(self, worker: int, shard: Task) -> None:
        self.task = shard

    def wait(self) -> list[Event]:
        events, self.pending = self.pending, []
        if self.task is not None:
            task, self.task = self.task, None
            events.append(Event("done", 0, task.name, result=self.open().run(task, self.progress)))
        return events

    def stop(self, now: bool = False) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
