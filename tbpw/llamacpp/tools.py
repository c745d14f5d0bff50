"""Run a llama.cpp tool of the active build: argument list in, captured output and a log file out.

Both streams are read as the tool writes them, so its progress (tbpw.llamacpp.progress) shows while it runs;
every tool starts through `launch`, the one place a command line passes (tests watch it there).
"""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tbpw.errors import TbpwError, os_error
from tbpw.llamacpp import logflush, progress, resources
from tbpw.llamacpp.build import BuildInfo, active_build

LOG_TAIL_LINES = 12


@dataclass(frozen=True)
class ToolRun:
    tool: str
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    log_path: Path
    seconds: float

    @property
    def output(self) -> str:
        """stdout then stderr: parsers that look for a line in either read this."""
        return self.stdout + "\n" + self.stderr


def launch(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a tool with both streams piped and no input (in `cwd`, when given)."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            cwd=cwd)


def run_tool(tool: str, args: Sequence[str | os.PathLike], *, log_path: Path | str | None = None,
             build: BuildInfo | None = None, check: bool = True, timeout: float | None = None,
             env: dict[str, str] | None = None, meter: progress.Meter | None = None,
             cwd: Path | None = None) -> ToolRun:
    """Run `tool` (e.g. "llama-perplexity") with `args`, in `cwd` when given; both streams go to `log_path`.

    With `check`, a non-zero exit raises TbpwError naming the tool, the exit status, the log path, and
    carrying the log's last lines. `meter` says how the tool shows its progress (shown when a display is active).
    """
    build = build or active_build()
    exe = build.tool(tool)
    argv = [str(exe), *map(str, args)]
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"{tool}.", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with progress.track(tool, meter) as tracker:
        proc = launch(argv, _environment(env), cwd)
        streams = {"stdout": _Reader(proc.stdout, "stdout", tracker), "stderr": _Reader(proc.stderr, "stderr", tracker)}
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
        stdout, stderr = (streams[name].text() for name in ("stdout", "stderr"))
        if tracker is not None:
            tracker.ok = returncode == 0
    seconds = time.monotonic() - start
    ending = f"exit {returncode}" if returncode is not None else "killed"
    try:
        log_path.write_text(f"$ {' '.join(argv)}\n===== stdout =====\n{stdout}\n===== stderr =====\n{stderr}\n"
                            f"===== {ending} after {seconds:.2f} s =====\n", encoding="utf-8")
    except OSError as exc:  # a full or read-only disk: say so, naming the log
        raise os_error(exc, f"write the log of {tool}", log_path) from None
    if returncode is None:
        raise TbpwError(f"{tool} did not finish within {timeout:.0f} s: raise the timeout or give it less work "
                        f"(log: {log_path})")
    run = ToolRun(tool, tuple(argv[1:]), returncode, stdout, stderr, log_path, seconds)
    if check and returncode != 0:
        tail = "\n".join((stderr.strip() or stdout.strip()).splitlines()[-LOG_TAIL_LINES:])
        reason = _last_error_line(stderr) or f"exit status {returncode}"
        raise TbpwError(f"{tool} failed: {reason} (log: {log_path})", details=tail)
    return run


class _Reader:
    """Reads one stream of a tool on its own thread, as the tool writes it, and passes it to the tracker."""

    def __init__(self, pipe: IO[bytes] | None, name: str, tracker: progress.Tracker | None):
        assert pipe is not None  # launch pipes both streams
        self.pipe, self.name, self.tracker = pipe, name, tracker
        self.parts: list[str] = []
        self.thread = threading.Thread(target=self._read, name=f"tbpw-{name}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with self.pipe:
            while block := os.read(self.pipe.fileno(), 1 << 16):
                self._add(decoder.decode(block))
        self._add(decoder.decode(b"", final=True))

    def _add(self, text: str) -> None:
        if text:
            self.parts.append(text)
            if self.tracker is not None:
                self.tracker.feed(self.name, text)

    def text(self) -> str:
        """Everything the stream carried, with newlines as text mode reads them (after the stream closed)."""
        self.thread.join()
        return "".join(self.parts).replace("\r\n", "\n").replace("\r", "\n")


def _environment(extra: dict[str, str] | None) -> dict[str, str]:
    # The preload keeps the final lines that llama.cpp's log thread would otherwise drop at exit.
    # The running task's slot (its GPU, tbpw.llamacpp.resources) comes before what the caller adds.
    merged = {**os.environ, **resources.environment(), **(extra or {})}
    return {**merged, **logflush.preload_env(merged)}


def _last_error_line(stderr: str) -> str:
    """The most telling line of a failed tool's stderr (llama.cpp prints errors with these prefixes)."""
    for line in reversed(stderr.splitlines()):
        low = line.lower()
        if any(word in low for word in ("error", "failed", "unable", "cannot", "invalid")):
            return _LOG_PREFIX.sub("", line.strip())[:200]
    return ""


# The time stamp and level llama.cpp's common log puts before each line, e.g. "0.00.007.718 E ".
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")
