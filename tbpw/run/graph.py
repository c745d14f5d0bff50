"""A run as a graph of tasks: each task one stage (a name, a call, what it needs) and the tasks it waits for.

The graph only declares. `TaskGraph.add(name, call, *args)` records a task whose arguments may hold `Ref`s
to other tasks' results (anywhere inside lists, tuples and dicts) and `Derived` values computed from them;
those are its dependencies, resolved just before it runs. A task may run only when a condition holds (`when`),
and it carries its own cost estimate (`estimate`, which `tbpw.run.costplan` sums). Which task runs where and when is the scheduler's and the executor's business
(`tbpw.run.execute`, the executor plugins); a task's result comes back to the driver, so it must be small:
paths and numbers, never file contents (big files stay in the run directory, on storage every worker sees).

A `Job` (tbpw.jobs) is what an executor receives: one task with its arguments resolved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tbpw.errors import TbpwError
from tbpw.jobs import Resources


@dataclass(frozen=True)
class Ref:
    """The result of task `task` (with `key`, one item of it), as an argument of another task."""

    task: str
    key: str | int | None = None

    def __getitem__(self, key: str | int) -> Ref:
        return Ref(self.task, key)


@dataclass(frozen=True)
class Derived:
    """A value the driver computes from other tasks' results just before a task runs: `fn(*args)`, the `Ref`s in
    `args` resolved. Small and pure (which of a target's quants is selected, say); `fn` must be picklable."""

    fn: Callable[..., Any]
    args: tuple = ()


def refs_in(value: Any) -> Iterator[Ref]:
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, Derived):
        yield from refs_in(value.args)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from refs_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from refs_in(v)


def _rebuild(value: Any, ref: Callable[[Ref], Any], derived: Callable[[Derived], Any]) -> Any:
    """`value` with each `Ref` and `Derived` replaced (inside lists, tuples and dicts)."""
    if isinstance(value, Ref):
        return ref(value)
    if isinstance(value, Derived):
        return derived(value)
    if isinstance(value, Mapping):
        return {k: _rebuild(v, ref, derived) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_rebuild(v, ref, derived) for v in value)
    if isinstance(value, list):
        return [_rebuild(v, ref, derived) for v in value]
    return value


def resolve(value: Any, results: Mapping[str, Any]) -> Any:
    """`value` with every `Ref` replaced by the result it names, and every `Derived` by its value."""

    def result(ref: Ref) -> Any:
        found = results[ref.task]
        return found if ref.key is None else found[ref.key]

    return _rebuild(value, result, lambda d: d.fn(*resolve(d.args, results)))


@dataclass
class Task:
    name: str
    call: Callable[..., Any]  # called as call(*args, log=..., **kwargs); picklable for executors out of process
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    # a condition (a Derived of other results): when it is false the task does not run and its result is `otherwise`
    when: Derived | None = None
    otherwise: Any = None
    after: tuple[str, ...] = ()  # tasks it waits for without reading their results
    # its cost estimate: called with the model's size (None: not known yet), returns a tbpw.stages.cost.Cost
    estimate: Callable[[Any], Any] | None = None

    @property
    def deps(self) -> list[str]:
        return list(dict.fromkeys([*(r.task for r in refs_in((self.args, self.kwargs, self.when))), *self.after]))


class TaskGraph:
    """Tasks in the order they were declared (the order a single worker runs them in)."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}

    def add(self, name: str, call: Callable[..., Any], *args: Any, resources: Resources | None = None,
            when: Derived | None = None, otherwise: Any = None, after: tuple[str, ...] = (),
            estimate: Callable[[Any], Any] | None = None, **kwargs: Any) -> Ref:
        if name in self.tasks:
            raise TbpwError(f"two tasks are named {name!r}: each stage of a run needs its own name")
        task = Task(name, call, args, kwargs, resources or Resources(), when, otherwise, tuple(after), estimate)
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
            return _rebuild(value, lambda r: Ref(names[r.task], r.key), lambda d: Derived(d.fn, rename(d.args)))

        for task in other:
            self.add(names[task.name], task.call, *rename(task.args), resources=task.resources, when=rename(task.when),
                     otherwise=task.otherwise, after=tuple(names[a] for a in task.after), estimate=task.estimate,
                     **rename(task.kwargs))
        return names

    def needed_by(self, names: Iterable[str]) -> TaskGraph:
        """The tasks `names` need (themselves and every task they wait for), in declaration order: a part of a run
        to execute alone (what a benchmark times)."""
        wanted: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo += self.tasks[name].deps
        part = TaskGraph()
        part.tasks = {name: task for name, task in self.tasks.items() if name in wanted}
        return part

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {name: [] for name in self.tasks}
        for task in self:
            for dep in task.deps:
                out[dep].append(task.name)
        return out
