"""The exceptions a user sees as one-line messages instead of a traceback."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class TbpwError(Exception):
    """A problem the user can fix: the message names the cause and the fix, on one line."""

    def __init__(self, message: str, *, details: str | None = None):
        super().__init__(message)
        self.details = details  # extra lines (a log tail) shown after the message

    @property
    def problems(self) -> list[str]:
        """Every mistake this error stands for, one line each."""
        return [str(self)]


class Problems(TbpwError):
    """Several independent mistakes found at once (a recipe with more than one), one line each.

    `str()` is the first, so code that expects one line still gets one; the command line prints them all."""

    def __init__(self, problems: Sequence[str]):
        if not problems:
            raise ValueError("Problems needs at least one problem")
        super().__init__(problems[0])
        self._problems = list(problems)

    @property
    def problems(self) -> list[str]:
        return list(self._problems)


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so that the same clean-up runs; the exit status differs (143, not 130)."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` (a KeyboardInterrupt), so a terminated command cleans up as after Ctrl-C:
    temporary files go, running tools are stopped, finished work stays. Only the main thread can install a
    handler; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupted(TbpwError):
    """Ctrl-C or SIGTERM stopped a command: the message says what was kept and how to resume."""

    terminated: bool  # by SIGTERM (else Ctrl-C)

    def __init__(self, message: str, *, cause: BaseException | None = None):
        super().__init__(message)
        self.terminated = cause.terminated if isinstance(cause, Interrupted) else isinstance(cause, Terminated)


def interrupt_exit_status(exc: BaseException) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for Ctrl-C (SIGINT)."""
    terminated = exc.terminated if isinstance(exc, Interrupted) else isinstance(exc, Terminated)
    return 143 if terminated else 130


_OS_HINTS = {
    errno.ENOSPC: "free space on that disk, or choose another location",
    errno.EDQUOT: "free space within your quota, or choose another location",
    errno.EACCES: "that location is not writable by you: choose another one or fix its permissions",
    errno.EPERM: "that location is not writable by you: choose another one or fix its permissions",
    errno.EROFS: "that file system is read-only: choose a writable location",
    errno.EISDIR: "a folder is there where a file is expected: give a file path",
    errno.ENOTDIR: "a file is there where a folder is expected: fix the path",
    errno.ENOENT: "it does not exist: check the path",
}


def os_error(exc: OSError, doing: str, path: os.PathLike | str | None = None) -> TbpwError:
    """A one-line error for an OSError while `doing` something ("write", "read") with a file, naming the file."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno or 0, "check the file and the disk")
    return TbpwError(f"cannot {doing} {where} ({reason}): {hint}")
