"""What an executor plugin receives and reports: jobs, their resources, the checks a worker makes, job events.

A `Job` is one task of a run's graph (tbpw.run.graph) with its arguments resolved, plus what every worker checks
before running it (the driver's llama.cpp build key, the run directory being visible). It is picklable, so an
executor may run it in another process or on another machine. These types sit below the plugin contracts
(tbpw.plugin.base's `Executor`) and the graph that makes jobs, so both can name them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
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
