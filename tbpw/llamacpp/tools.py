"""Run a llama.cpp tool of the active build: argument list in, captured output and a log file out."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tbpw.errors import TbpwError, os_error
from tbpw.llamacpp import logflush, resources
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


def run_tool(tool: str, args: Sequence[str | os.PathLike], *, log_path: Path | str | None = None,
             build: BuildInfo | None = None, check: bool = True, timeout: float | None = None,
             env: dict[str, str] | None = None) -> ToolRun:
    """Run `tool` (e.g. "llama-perplexity") with `args`; both streams go to `log_path`.

    With `check`, a non-zero exit raises TbpwError naming the tool, the exit status, the log path, and
    carrying the log's last lines.
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
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                              env=_environment(env), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise TbpwError(f"{tool} did not finish within {timeout:.0f} s: raise the timeout or give it less work") from exc
    seconds = time.monotonic() - start
    try:
        log_path.write_text(f"$ {' '.join(argv)}\n===== stdout =====\n{proc.stdout}\n===== stderr =====\n{proc.stderr}\n"
                            f"===== exit {proc.returncode} after {seconds:.2f} s =====\n", encoding="utf-8")
    except OSError as exc:  # a full or read-only disk: say so, naming the log
        raise os_error(exc, f"write the log of {tool}", log_path) from None
    run = ToolRun(tool, tuple(argv[1:]), proc.returncode, proc.stdout, proc.stderr, log_path, seconds)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-LOG_TAIL_LINES:])
        reason = _last_error_line(proc.stderr) or f"exit status {proc.returncode}"
        raise TbpwError(f"{tool} failed: {reason} (log: {log_path})", details=tail)
    return run


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
