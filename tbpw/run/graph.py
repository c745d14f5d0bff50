"""A run as a graph of tasks: each task one stage (a name, a call, what it needs) and the tasks it waits for.

The graph only declares. `TaskGraph.add(name, call, *args)` records a task whose arguments may hold `Ref`s
to other tasks' results (anywhere inside lists, tuples and dicts); those are its dependencies, resolved
just before it runs. Which task runs where and when is the scheduler's and the executor's business
(`tbpw.run.execute`, the executor plugins); a task's result comes back to the driver, so it must be small:
paths and numbers, never file contents (big files stay in the run directory, on storage every worker sees).

A `Job` is what an executor receives: one task with its arguments resolved, plus what every worker checks
before running it (the driver's llama.cpp build key, the run directory being visible). It is picklable, so
an executor may run it in another process or on another machine.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tbpw.errors import TbpwError
from tbpw.llamacpp.resources import ToolSlot, use

Log = Callable[[str], None]


@dataclass(frozen=True)
class Resources:
    """What a task needs while it runs.

    `gpu`: its tools offload to a GPU (an executor gives it one of its own when it has several);
    `memory`: bytes of RAM it is expected to use (0: unknown, little); `exclusive`: it needs the machine to
    itself (llama-bench measures speed, which other work running beside it would distort)."""

    gpu: bool = False
    memory: int = 0
    exclusive: bool = False


@dataclass(frozen=True)
class Ref:
    """The result of task `task` (with `key`, one item of it), as an argument of another task."""

    task: str
    key: str | int | None = None

    def __getitem__(self, key: str | int) -> Ref:
        return Ref(self.task, key)


def refs_in(value: Any) -> Iterator[Ref]:
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from refs_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from refs_in(v)


def resolve(value: Any, results: Mapping[str, Any]) -> Any:
    """`value` with every `Ref` replaced by the result it names."""
    if isinstance(value, Ref):
        result = results[value.task]
        return result if value.key is None else result[value.key]
    if isinstance(value, Mapping):
        return {k: resolve(v, results) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(resolve(v, results) for v in value)
    if isinstance(value, list):
        return [resolve(v, results) for v in value]
    return value


@dataclass
class Task:
    name: str
    call: Callable[..., Any]  # called as call(*args, log=..., **kwargs); picklable for executors out of process
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)

    @property
    def deps(self) -> list[str]:
        return list(dict.fromkeys(r.task for r in refs_in((self.args, self.kwargs))))


class TaskGraph:
    """Tasks in the order they were declared (the order a single worker runs them in)."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}

    def add(self, name: str, call: Callable[..., Any], *args: Any, resources: Resources | None = None,
            **kwargs: Any) -> Ref:
        if name in self.tasks:
            raise TbpwError(f"two tasks are named {name!r}: each stage of a run needs its own name")
        task = Task(name, call, args, kwargs, resources or Resources())
        for dep in task.deps:
            if dep not in self.tasks:
                raise TbpwError(f"task {name!r} needs {dep!r}, which is not declared before it: add {dep!r} first")
        self.tasks[name] = task
        return Ref(name)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks.values())

    def merge(self, other: TaskGraph, prefix: str) -> dict[str, str]:
        """Add every task of `other` under `prefix` (its refs renamed too); returns old name -> new name."""
        names = {name: f"{prefix}{name}" for name in other.tasks}

        def rename(value: Any) -> Any:
            if isinstance(value, Ref):
                return Ref(names[value.task], value.key)
            if isinstance(value, Mapping):
                return {k: rename(v) for k, v in value.items()}
            if isinstance(value, tuple):
                return tuple(rename(v) for v in value)
            if isinstance(value, list):
                return [rename(v) for v in value]
            return value

        for task in other:
            self.add(names[task.name], task.call, *rename(task.args), resources=task.resources, **rename(task.kwargs))
        return names

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {name: [] for name in self.tasks}
        for task in self:
            for dep in task.deps:
                out[dep].append(task.name)
        return out


@dataclass(frozen=True)
class WorkerCheck:
    """What a worker verifies before it runs a job: the same llama.cpp build as the driver (outputs differ
    across builds) and the driver's paths (run directory, caches) visible at the same place."""

    build_key: str | None = None
    paths: tuple[Path, ...] = ()

    def verify(self, job: str) -> None:
        host = socket.gethostname()
        if self.build_key is not None:
            from tbpw.llamacpp.build import active_build

            try:
                here = active_build().key
            except TbpwError as exc:
                raise TbpwError(f"{job}: the worker on {host} has no usable llama.cpp build ({exc}): run the "
                                f"driver's `tbpw build` on every node") from None
            if here != self.build_key:
                raise TbpwError(f"{job}: the worker on {host} has llama.cpp build {here}, the driver {self.build_key}: "
                                "run the same `tbpw build` (source, backend, options) on every node, since outputs "
                                "differ across builds")
        for path in self.paths:
            if not path.exists():
                raise TbpwError(f"{job}: {path} is not visible on {host}: put the run directory and tbpw's caches on "
                                "storage every node mounts at the same path (docs/distributed.md)")


@dataclass(frozen=True)
class Job:
    """One task ready to run: its call with resolved arguments, its resources and the worker's checks."""

    name: str
    call: Callable[..., Any]
    args: tuple
    kwargs: dict[str, Any]
    resources: Resources
    check: WorkerCheck = field(default_factory=WorkerCheck)

    def execute(self, log: Log, slot: ToolSlot | None = None) -> Any:
        """Check the worker, then run the call with `slot`'s threads and GPUs; returns its (small) result."""
        self.check.verify(self.name)
        with use(slot):
            return self.call(*self.args, log=log, **self.kwargs)


@dataclass(frozen=True)
class JobEvent:
    """What an executor reports about a job: it started, finished with `value`, or failed with `error`."""

    name: str
    kind: Literal["started", "done", "failed"]
    value: Any = None
    error: BaseException | None = None
    log: tuple[str, ...] = ()  # lines the job logged, when the executor could not show them as they came
