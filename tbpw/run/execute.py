"""The scheduler: hand an executor every task whose dependencies are done, until the graph is done.

It is the same for every executor plugin: it resolves each ready task's arguments from the results so far and
submits it as a `Job`, and the executor decides when and where it runs; a task whose condition (`when`) does not
hold is done at once, without a job. Progress is one line per change: how many tasks are done, which run, how
many wait. The first failure stops the other jobs and is raised as it was (a `TbpwError` stays one line); Ctrl-C
stops them too. Either way every stage that finished is kept in the run directory, so the next run resumes from
there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tbpw.errors import Interrupted, TbpwError
from tbpw.jobs import Job, JobEvent, WorkerCheck
from tbpw.plugin.base import Executor
from tbpw.run.graph import TaskGraph, resolve

Log = Callable[[str], None]
POLL_SECONDS = 0.5


class RunInterrupted(Interrupted):
    """Ctrl-C stopped the run; the finished stages are kept and the next run resumes from them."""


class Progress:
    """Tasks waiting (for their dependencies or for room), running, done; one line on each change."""

    def __init__(self, graph: TaskGraph, log: Log, show: bool = True):
        self.total = len(graph)
        self.log = log
        self.show = show
        self.running: dict[str, float] = {}
        self.done: list[str] = []

    def started(self, name: str) -> None:
        self.running[name] = time.monotonic()

    def finished(self, name: str) -> None:
        self.running.pop(name, None)
        self.done.append(name)

    def line(self) -> str:
        waiting = self.total - len(self.done) - len(self.running)
        running = ", ".join(self.running) or "nothing"
        return f"[{len(self.done)}/{self.total} done] running: {running}; waiting: {waiting}"

    def show_line(self) -> None:
        if self.show:
            self.log(self.line())


def execute(graph: TaskGraph, executor: Executor, *, log: Log, check: WorkerCheck | None = None,
            show_progress: bool = True) -> dict[str, Any]:
    """Run every task of `graph` on `executor`; returns task name -> result."""
    check = check or WorkerCheck()
    waiting_for = {task.name: set(task.deps) for task in graph}
    dependents = graph.dependents()
    results: dict[str, Any] = {}
    progress = Progress(graph, log, show_progress)
    submitted: set[str] = set()

    def finish(name: str, value: Any) -> None:
        results[name] = value
        for nxt in dependents[name]:
            waiting_for[nxt].discard(name)

    def submit_ready() -> None:
        ready = True
        while ready:
            ready = False
            for task in graph:  # declaration order: one worker runs the tasks in the order they were declared
                if task.name in submitted or waiting_for[task.name]:
                    continue
                submitted.add(task.name)
                if task.when is not None and not resolve(task.when, results):
                    finish(task.name, task.otherwise)  # not needed: done without running, its dependents may go on
                    progress.finished(task.name)
                    ready = True
                    continue
                executor.submit(Job(task.name, task.call, resolve(task.args, results), resolve(task.kwargs, results),
                                    task.resources, check))

    executor.open(log)
    try:
        log(f"executor: {executor.describe()}; {len(graph)} tasks")
        submit_ready()
        while len(results) < len(graph):
            events = executor.poll(POLL_SECONDS)
            for event in events:
                _handle(event, results, progress, log)
                if event.kind == "done":
                    finish(event.name, event.value)
            if events:
                submit_ready()
                progress.show_line()
            if not events and len(submitted) == len(results) and len(results) < len(graph):
                raise TbpwError("the task graph cannot go on: a task waits for one that never ran (a bug in the "
                                "graph's declaration)")
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM delivered as one (tbpw.errors.Terminated)
        executor.cancel()
        raise RunInterrupted(f"interrupted: {len(results)} of {len(graph)} tasks had finished and are kept; "
                             "run the same command again to resume", cause=exc) from None
    except BaseException:
        executor.cancel()
        raise
    finally:
        executor.close()
    return results


def _handle(event: JobEvent, results: dict[str, Any], progress: Progress, log: Log) -> None:
    for line in event.log:
        log(line)
    if event.kind == "started":
        progress.started(event.name)
    elif event.kind == "done":
        results[event.name] = event.value
        progress.finished(event.name)
    elif event.kind == "failed":
        assert event.error is not None
        raise event.error
    else:
        raise TbpwError(f"an executor reported {event.kind!r} for {event.name}: it may report started, done or failed")


def executor_from(ref: Any) -> Executor:
    """The executor plugin a recipe's `executor:` names (a PluginRef), with its validated options."""
    from tbpw.plugin.manager import get_manager

    return get_manager().executors().create(ref.name, ref.options)
