"""`local`: the run's tasks on this machine, several at once.

`workers: 1` is a plain sequential run: each job runs in the calling thread, in the order the graph
declares them, its tools with their own thread count and every GPU (exactly what tbpw did before it had
executors). With more workers each job runs in a thread of its own; its llama.cpp tools get an equal share
of the cores (`threads`) and, when it offloads to a GPU and the machine has several, one GPU of its own
(CUDA_VISIBLE_DEVICES). A job that needs the machine to itself (llama-bench, which measures speed) waits
until nothing else runs. Memory: jobs start only while their declared memory fits the budget.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections.abc import Callable

from pydantic import Field

from tbpw import (
    Executor,
    Job,
    JobEvent,
    PluginOptions,
    ToolSlot,
    cpu_count,
    split_threads,
    stop_tool_processes,
    visible_gpus,
)

# How long a cancelled run waits for its workers to clean up (their tools are stopped; what is left is Python
# code removing unfinished outputs), so that an interrupted run leaves nothing half-written behind.
STOP_WAIT_SECONDS = 60.0


class LocalOptions(PluginOptions):
    workers: int | None = Field(None, ge=1, description="jobs at once (default: from the cores and GPUs)")
    threads: int | None = Field(None, ge=1, description="threads of each job's tools (default: cores / workers)")
    gpus: list[str] | None = Field(None, description="GPU ids to hand out (default: the visible ones)")
    memory_gib: float | None = Field(None, gt=0, description="RAM the running jobs may declare together "
                                                             "(default: 90% of this machine's)")


def default_workers(cores: int, gpus: int) -> int:
    """One worker per 2 cores, at least 2 where there are 2 cores and at most 8, and at least one per GPU.

    Two half-size jobs beat two full-size ones in a row: llama.cpp's tools scale sublinearly with threads and
    have single-threaded phases (loading, writing), and the graph keeps both workers busy (benchmarks/parallel.py:
    1.65x with 2 workers on 2 cores, docs/results/speed.md)."""
    return max(gpus, min(2, cores), min(8, cores // 2), 1)


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class Local(Executor):
    name = "local"
    description = "this machine: a pool sized from its cores and GPUs (workers: 1 runs one stage at a time)"
    Options = LocalOptions
    default = True

    def __init__(self, options=None):
        super().__init__(options)
        self.cores = cpu_count()
        self.gpu_ids = list(self.options.gpus) if self.options.gpus is not None else visible_gpus()
        self.workers = self.options.workers or default_workers(self.cores, len(self.gpu_ids))
        self.threads = self.options.threads or (split_threads(self.cores, self.workers) if self.workers > 1 else None)
        gib = self.options.memory_gib
        self.memory = int(gib * 2**30) if gib else int(physical_memory() * 0.9)
        self._queue: list[Job] = []
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self._running: dict[str, tuple[Job, threading.Thread | None, tuple[str, ...]]] = {}
        self._free_gpus = list(self.gpu_ids)
        self._log: Callable[[str], None] = print

    def describe(self) -> str:
        if self.workers == 1:
            return "local, 1 worker (one stage at a time)"
        gpus = f", GPUs {','.join(self.gpu_ids)} one per GPU job" if self.gpu_ids else ""
        return f"local, {self.workers} workers x {self.threads} threads{gpus}"

    def open(self, log: Callable[[str], None]) -> None:
        self._log = log

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    # ------------------------------------------------------------------------------------ scheduling

    def _fits(self, job: Job) -> bool:
        if len(self._running) >= self.workers:
            return False
        if job.resources.exclusive:
            return not self._running
        if any(j.resources.exclusive for j, _, _ in self._running.values()):
            return False
        if job.resources.gpu and self.gpu_ids and not self._free_gpus:
            return False
        used = sum(j.resources.memory for j, _, _ in self._running.values())
        return not self._running or used + job.resources.memory <= self.memory

    def _slot(self, job: Job) -> tuple[ToolSlot | None, tuple[str, ...]]:
        if self.workers == 1 and not self.options.threads:
            return None, ()
        threads = self.cores if job.resources.exclusive else self.threads
        if not self.gpu_ids:
            return ToolSlot(threads=threads), ()
        if job.resources.gpu:
            taken = (self._free_gpus.pop(0),)
            return ToolSlot(threads=threads, gpus=taken), taken
        return ToolSlot(threads=threads, gpus=()), ()  # CPU work: keep it off the GPUs the others hold

    def _start_ready(self) -> list[JobEvent]:
        started = []
        for job in list(self._queue):
            if not self._fits(job):
                continue
            self._queue.remove(job)
            slot, gpus = self._slot(job)
            if self.workers == 1:  # in the calling thread: today's sequential run, Ctrl-C included
                self._running[job.name] = (job, None, gpus)
                started.append(JobEvent(job.name, "started"))
                started.append(self._run(job, slot))
                del self._running[job.name]
                return started
            thread = threading.Thread(target=self._work, args=(job, slot), name=f"tbpw-{job.name}", daemon=True)
            self._running[job.name] = (job, thread, gpus)
            started.append(JobEvent(job.name, "started"))
            thread.start()
        return started

    def _run(self, job: Job, slot: ToolSlot | None) -> JobEvent:
        try:
            return JobEvent(job.name, "done", job.execute(self._log, slot))
        except Exception as exc:  # reported to the scheduler, which stops the run and raises it
            return JobEvent(job.name, "failed", error=exc)

    def _work(self, job: Job, slot: ToolSlot | None) -> None:
        try:
            event = self._run(job, slot)
        except BaseException as exc:  # KeyboardInterrupt sent by cancel()
            event = JobEvent(job.name, "failed", error=exc)
        self._events.put(event)

    def poll(self, timeout: float) -> list[JobEvent]:
        events = self._start_ready()
        if self.workers == 1:
            return events
        try:
            first = self._events.get(timeout=0 if events else timeout)
        except queue.Empty:
            return events
        finished = [first]
        while True:
            try:
                finished.append(self._events.get_nowait())
            except queue.Empty:
                break
        for event in finished:
            _, _, gpus = self._running.pop(event.name)
            self._free_gpus += gpus
        return events + finished

    def cancel(self) -> None:
        """Drop the queue, interrupt the running jobs' Python code and stop the tools they started."""
        self._queue.clear()
        threads = [t for _, t, _ in self._running.values() if t is not None and t.is_alive()]
        for thread in threads:
            if thread.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                           ctypes.py_object(KeyboardInterrupt))
        stop_tool_processes()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._running.clear()
