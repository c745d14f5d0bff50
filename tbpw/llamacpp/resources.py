"""What one running task may use of the machine: the threads of its tools and the GPUs they see.

An executor that runs several tasks at once gives each a `ToolSlot` (`with use(slot): ...`); every tool
runner of this package then passes the slot's thread count where its caller gave none, and runs the tool
with the slot's environment (`CUDA_VISIBLE_DEVICES` for the GPU it was given). Outside a slot nothing
changes: the tools pick their own thread count and see every GPU, as a single sequential run always did.
The slot lives in a context variable, so threads running different tasks each see their own.
"""

from __future__ import annotations

import contextvars
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

GPU_ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class ToolSlot:
    """Threads for each tool run (None: the tool's own default) and the GPUs it sees (None: all of them)."""

    threads: int | None = None
    gpus: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)  # anything else the executor wants the tools to see

    def environment(self) -> dict[str, str]:
        extra = dict(self.env)
        if self.gpus is not None:
            extra[GPU_ENV] = ",".join(self.gpus)
        return extra


_slot: contextvars.ContextVar[ToolSlot | None] = contextvars.ContextVar("tbpw_tool_slot", default=None)


@contextmanager
def use(slot: ToolSlot | None) -> Iterator[ToolSlot | None]:
    """Run the block's tools within `slot` (None: no limits)."""
    token = _slot.set(slot)
    try:
        yield slot
    finally:
        _slot.reset(token)


def current() -> ToolSlot | None:
    return _slot.get()


def threads(given: int | None = None) -> int | None:
    """The thread count a tool run should get: the caller's, else the slot's, else None (the tool decides)."""
    if given:
        return given
    slot = _slot.get()
    return slot.threads if slot is not None else None


def environment() -> dict[str, str]:
    """Variables the tools of the current slot run with (empty outside a slot)."""
    slot = _slot.get()
    return slot.environment() if slot is not None else {}


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """The GPU ids tasks may be given: $CUDA_VISIBLE_DEVICES when set, else every GPU nvidia-smi lists."""
    env = os.environ if environ is None else environ
    if GPU_ENV in env:
        return [g.strip() for g in env[GPU_ENV].split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def split_threads(total: int, parts: int) -> int:
    """Threads for each of `parts` tasks sharing `total` CPUs (at least one)."""
    return max(1, total // max(1, parts))




def stop_tool_processes(bin_dirs: Sequence[os.PathLike | str] | None = None) -> list[int]:
    """Terminate the running children of this process whose program lives in one of `bin_dirs` (default: the
    active build's, where the llama.cpp tools and tbpw's collector are): the tools the running tasks started.
    Returns their pids. Linux only (it reads /proc); elsewhere it stops nothing."""
    if bin_dirs is None:
        from tbpw.errors import TbpwError
        from tbpw.llamacpp.build import active_build

        try:
            bin_dirs = [active_build().bin_dir]
        except TbpwError:  # no build: no tool can be running
            return []
    roots = [os.path.realpath(d) for d in bin_dirs]
    stopped = []
    for pid in _children(os.getpid()):
        try:
            exe = os.path.realpath(f"/proc/{pid}/exe")
        except OSError:
            continue
        if any(exe.startswith(root + os.sep) for root in roots):
            try:
                os.kill(pid, 15)
                stopped.append(pid)
            except OSError:
                pass
    return stopped


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found += [int(c) for c in fh.read().split()]
        except OSError:
            continue
    return found
