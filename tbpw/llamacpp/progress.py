"""Live progress of llama.cpp tools, read from their own output as it streams.

A `Meter` says how one tool mode reports its progress: a line that announces the total (chunks, tasks)
and the marks it prints as it goes (`[3]224.61,` for a perplexity chunk, a KL-divergence row, a task row,
`[ 12/ 38]` for a quantized tensor, `[57/295]` for a build step). `run_tool` feeds both streams of the tool
to a `Tracker`, which turns what it reads into (done, total) and passes that to the active `Display`:

- `TerminalDisplay`: a rich progress bar (elapsed time, ETA) on a terminal, gone when the tool ends;
- `LogDisplay`: a plain line with the counts every `interval` seconds, for logs and CI, which cannot show
  a bar; a tool that ends before the first interval prints nothing, one that printed lines prints a last one.

Nothing is shown unless a caller installs a display (`showing`): the command line does, for every command;
library calls and tests stay silent unless they ask. `stage` names the pipeline stage a tool runs for.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

INTERVAL_ENV = "TBPW_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0  # seconds between plain progress lines
_NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_KEEP = 4096  # characters kept of a stream that has not matched yet (a mark may arrive in pieces)


@dataclass(frozen=True)
class Meter:
    """How a tool mode shows progress in its output.

    `mark` matches once per unit of work; its group `done` (when present) is the count so far, its group
    `started` the number of the unit that just began, else every match counts one; its group `total` (when
    present) is the total. `total` matches the lines announcing the total (the last one read wins: its first
    group that matched). `expected` is the total as the arguments ask for it, used until the tool says.
    """

    what: str  # e.g. "KL divergence"
    unit: str  # e.g. "chunks"
    mark: re.Pattern[str]
    total: re.Pattern[str] | None = None
    expected: int | None = None

    def expecting(self, total: int | None) -> Meter:
        """This meter with the total its caller asked the tool for."""
        return Meter(self.what, self.unit, self.mark, self.total, total)


def _meter(what: str, unit: str, mark: str, total: str | None = None) -> Meter:
    return Meter(what, unit, re.compile(mark, re.M), re.compile(total) if total else None)


# The running perplexity estimate llama-perplexity and llama-imatrix print after each chunk: "[3]164.83,"
PERPLEXITY = _meter("perplexity", "chunks", rf"\[(?P<done>\d+)\]{_NUM},", r"calculating perplexity over (\d+) chunks")
IMATRIX = _meter("imatrix", "chunks", rf"\[(?P<done>\d+)\]{_NUM},", r"compute_imatrix: computing over (\d+) chunks")
# tbpw's collector: "[4/8] 1.02 s" after each batch of chunks
COLLECTOR = _meter("imatrix", "chunks", r"^\[(?P<done>\d+)/(?P<total>\d+)\] ", r"collecting over (\d+) chunks")
KL_DIVERGENCE = _meter("KL divergence", "chunks", rf"^\s*(?P<done>\d+)\s+{_NUM} ±", r"kl_divergence: computing over (\d+) chunks")
# the task modes announce the tasks in the file, then (when asked for fewer) how many they picked
HELLASWAG = _meter("HellaSwag", "tasks", rf"^(?P<done>\d+)\t{_NUM}%\t\[",
                   r"loaded (\d+) tasks from prompt|selecting (\d+) randomized tasks")
WINOGRANDE = _meter("WinoGrande", "tasks", rf"^(?P<done>\d+)\t{_NUM}\t",
                    r"loaded (\d+) tasks from prompt|selecting (\d+) random tasks")
MULTIPLE_CHOICE = _meter("multiple choice", "tasks", rf"^(?P<done>\d+)\t{_NUM}\s*$", r"score over (\d+) tasks")
QUANTIZE = _meter("quantize", "tensors", r"^\[\s*(?P<done>\d+)/\s*(?P<total>\d+)\] ")
# llama-bench --progress: "llama-bench: benchmark 2/3: starting" (the test before it has finished)
BENCH = _meter("bench", "tests", r"benchmark (?P<started>\d+)/(?P<total>\d+): starting")
BUILD = _meter("build", "steps", r"^\[(?P<done>\d+)/(?P<total>\d+)\] ")  # Ninja
BUILD_MAKE = _meter("build", "%", r"^\[\s*(?P<done>\d+)%\]").expecting(100)  # Make: a percentage


class Bar:
    """One tool run on a display."""

    def update(self, done: int, total: int | None) -> None:
        """The tool has done `done` of `total` (None: not known yet)."""

    def finish(self, ok: bool) -> None:
        """The tool ended (`ok`: with exit status 0)."""


class Display:
    """Where progress goes; `begin` is called once per tool run, from the thread that runs it."""

    def begin(self, label: str, unit: str, total: int | None) -> Bar:
        return Bar()


class _TerminalBar(Bar):
    def __init__(self, display: TerminalDisplay, task: TaskID):
        self.display, self.task = display, task
        self.start = time.monotonic()

    def update(self, done: int, total: int | None) -> None:
        # the tools print their marks in bursts (a batch of chunks at once): rich's windowed speed would
        # promise the end after each burst, the average since the start does not
        self.display.progress.update(self.task, completed=done, total=total,
                                     eta=_eta(time.monotonic() - self.start, done, total) or "-:--")

    def finish(self, ok: bool) -> None:
        self.display.end(self.task)


class TerminalDisplay(Display):
    """A rich progress bar per running tool, with elapsed time and ETA; each bar disappears when its tool ends."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress: Progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=console, transient=True)
        self._lock = threading.Lock()
        self._running = 0

    def begin(self, label: str, unit: str, total: int | None) -> Bar:
        with self._lock:
            if self._running == 0:
                self.progress.start()
            self._running += 1
            return _TerminalBar(self, self.progress.add_task(label, total=total, unit=unit, eta="-:--"))

    def end(self, task: TaskID) -> None:
        with self._lock:
            self.progress.remove_task(task)
            self._running -= 1
            if self._running == 0:
                self.progress.stop()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _eta(elapsed: float, done: int, total: int | None) -> str:
    """The time left at the average pace so far ("" when there is nothing to go by or nothing left)."""
    return _duration(elapsed / done * (total - done)) if total and 0 < done < total else ""


def counts_line(label: str, unit: str, done: int, total: int | None, elapsed: float) -> str:
    """`label: 3/8 chunks (38%), 0:12 elapsed, ETA 0:20` (what a log gets instead of a bar)."""
    if not total:
        return f"{label}: {done} {unit}, {_duration(elapsed)} elapsed"
    eta = _eta(elapsed, done, total)
    return f"{label}: {done}/{total} {unit} ({100 * done // total}%), {_duration(elapsed)} elapsed" + \
        (f", ETA {eta}" if eta else "")


class _LogBar(Bar):
    def __init__(self, display: LogDisplay, label: str, unit: str, total: int | None):
        self.display, self.label, self.unit = display, label, unit
        self.done, self.total = 0, total
        self.start = self.last = time.monotonic()
        self.printed = False

    def update(self, done: int, total: int | None) -> None:
        self.done, self.total = done, total
        now = time.monotonic()
        if now - self.last >= self.display.interval:
            self.last = now
            self.printed = True
            self.display.write(counts_line(self.label, self.unit, done, total, now - self.start))

    def finish(self, ok: bool) -> None:
        if self.printed:
            state = "finished" if ok else "failed"
            self.display.write(f"{counts_line(self.label, self.unit, self.done, self.total, time.monotonic() - self.start)}"
                               f", {state}")


class LogDisplay(Display):
    """Plain lines with counts, at most one per `interval` seconds per tool run (nothing for shorter runs)."""

    def __init__(self, stream: IO[str], interval: float | None = None):
        self.stream = stream
        self.interval = interval if interval is not None else float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
        self._lock = threading.Lock()

    def begin(self, label: str, unit: str, total: int | None) -> Bar:
        return _LogBar(self, label, unit, total)

    def write(self, line: str) -> None:
        with self._lock:
            self.stream.write(f"  {line}\n")
            self.stream.flush()


def for_console(console: Console, interval: float | None = None) -> Display:
    """A bar on a terminal, periodic lines otherwise (a pipe, a CI log, a file)."""
    if console.is_terminal:
        return TerminalDisplay(console)
    return LogDisplay(console.file, interval)


_display: Display | None = None
_stage: ContextVar[str | None] = ContextVar("tbpw_progress_stage", default=None)


@contextmanager
def showing(display: Display | None) -> Iterator[Display | None]:
    """Show the progress of every tool run inside the block on `display` (None: show nothing)."""
    global _display
    previous, _display = _display, display
    try:
        yield display
    finally:
        _display = previous


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Tool runs inside the block are shown as part of stage `name`."""
    token = _stage.set(name)
    try:
        yield
    finally:
        _stage.reset(token)


class Tracker:
    """Reads a running tool's output, stream by stream, and keeps its display up to date."""

    def __init__(self, meter: Meter, bar: Bar):
        self.meter, self.bar = meter, bar
        self.done, self.total = 0, meter.expected
        self.ok = False  # the runner sets it when the tool ended well
        self._pending: dict[str, str] = {}
        self._lock = threading.Lock()

    def feed(self, stream: str, text: str) -> None:
        """More output of `stream` ("stdout" or "stderr"); marks cut in two by the pipe are read once whole."""
        with self._lock:
            buffer = self._pending.get(stream, "") + text
            before = (self.done, self.total)
            if self.meter.total is not None:
                for m in self.meter.total.finditer(buffer):
                    self.total = int(next(g for g in m.groups() if g is not None))
            end = 0
            for m in self.meter.mark.finditer(buffer):
                end = m.end()
                groups = m.groupdict()
                if groups.get("total"):
                    self.total = int(groups["total"])
                if groups.get("done"):
                    self.done = max(self.done, int(groups["done"]))
                elif groups.get("started"):
                    self.done = max(self.done, int(groups["started"]) - 1)
                else:
                    self.done += 1
            rest = buffer[end:]
            # keep only what a mark could still complete: the last line, or the tail of a very long one
            cut = rest.rfind("\n", 0, max(0, len(rest) - 1))
            self._pending[stream] = rest[cut + 1:][-_KEEP:] if cut >= 0 else rest[-_KEEP:]
            if (self.done, self.total) != before:
                self.bar.update(self.done, self.total)

    def finish(self) -> None:
        with self._lock:
            if self.ok and self.total is not None and self.done != self.total:
                self.done = self.total  # a tool that ended well did it all (its last unit may print no mark)
                self.bar.update(self.done, self.total)
            self.bar.finish(self.ok)


@contextmanager
def track(tool: str, meter: Meter | None) -> Iterator[Tracker | None]:
    """A tracker for one run of `tool` on the active display (None when nothing is shown or no meter is given).
    The runner feeds it the tool's output and sets `ok` when the tool ended well."""
    display = _display
    if display is None or meter is None:
        yield None
        return
    name = _stage.get()
    label = f"{name}: {tool} {meter.what}" if name else f"{tool} {meter.what}"
    tracker = Tracker(meter, display.begin(label, meter.unit, meter.expected))
    try:
        yield tracker
    finally:
        tracker.finish()
