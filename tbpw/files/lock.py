"""One writer at a time: an advisory lock (flock) on a file beside what it guards, naming its holder.

The kernel drops the lock when its holder exits, however it exits (a SIGKILL included), so a lock is never
left behind; the file itself stays and is reused. The holder writes its pid, host and command into the
file, so that whoever finds it taken can say who has it.

    with FileLock(folder / ".lock") as lock:      # waits
        ...
    lock = FileLock(root / ".lock")
    if not lock.acquire(blocking=False):          # or refuse
        raise TbpwError(f"in use by {lock.holder()}")
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tbpw.errors import TbpwError, os_error

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock on the first byte instead
    fcntl = None  # type: ignore[assignment]
    import msvcrt


def _lock(fd: int, blocking: bool) -> bool:
    """Lock `fd`; False when another process holds it and `blocking` is off."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True
    while True:  # pragma: no cover (Windows)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            if not blocking:
                return False
            time.sleep(0.2)


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:  # pragma: no cover (Windows)
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class FileLock:
    """An exclusive lock on `path` (created if missing). Not re-entrant: one FileLock per holder."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, blocking: bool = True) -> bool:
        """Take the lock; without `blocking`, return False at once when another process has it."""
        if self._fd is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise os_error(exc, "create the lock file", self.path) from None
        try:
            taken = _lock(fd, blocking)
        except BaseException:
            os.close(fd)
            raise
        if not taken:
            os.close(fd)
            return False
        self._fd = fd
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]})
        try:
            # after the first byte, which Windows locks; readers skip leading blanks
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, b" " + record.encode())
        except OSError:
            pass  # the lock holds without the note; only the message naming the holder is poorer
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                _unlock(fd)
            finally:
                os.close(fd)

    def holder(self) -> str:
        """Who holds the lock, as its note says: "pid 123 on host (tbpw run r.yaml), since ..."."""
        try:
            note = json.loads(self.path.read_text(encoding="utf-8"))
            return (f"pid {note['pid']} on {note['host']} ({note['command']}), since {note['since']}")
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def __enter__(self) -> FileLock:
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass  # at interpreter exit: the kernel releases the lock with the process anyway


@contextmanager
def waiting_lock(path: Path | str, note: Callable[[str], None] | None = None) -> Iterator[FileLock]:
    """Hold the lock on `path`, waiting for another holder to finish (saying so through `note` first)."""
    lock = FileLock(path)
    if not lock.acquire(blocking=False):
        if note is not None:
            note(f"waiting for {lock.holder()}, which is working on {Path(path).parent}")
        lock.acquire(blocking=True)
    try:
        yield lock
    finally:
        lock.release()


def refuse_if_locked(lock: FileLock, what: str, fix: str) -> None:
    """Take `lock` now, or raise one line naming its holder: "<what> is in use by pid ...: <fix>"."""
    if not lock.acquire(blocking=False):
        raise TbpwError(f"{what} is in use by {lock.holder()}: {fix}")
