"""Atomic writes: a killed run never leaves a file that looks complete, nor temporary files for good.

Temporary files and folders are made beside their target and named `.<target>.<host>-<pid>.<random>.tmp`:
they vanish when the write ends (even by Ctrl-C or SIGTERM), and one left by a process that was killed
outright is removed by the next write of the same target on that host, once its pid is gone, or by a sweep of
its folder (`sweep_folder`: tbpw's caches sweep theirs when they are opened). A folder kept on purpose by a
failed step (its tools' logs, which the error names) stays a day before a sweep takes it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tbpw.errors import os_error

T = TypeVar("T")
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def temporary_prefix(target: Path) -> str:
    """The name every temporary stand-in for `target` starts with (this process's)."""
    return f".{target.name}.{_HOST}-{os.getpid()}."


def sweep_stale(target: Path) -> None:
    """Remove temporary stand-ins for `target` left by processes of this host that no longer run."""
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        m = _TEMPORARY.match(leftover.name)
        if m is None or m["target"] != target.name or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


KEEP_FAILED_FOLDERS_SECONDS = 24 * 3600


def sweep_folder(folder: Path | str) -> list[Path]:
    """Remove every temporary stand-in in `folder` left by a process of this host that no longer runs (a folder
    once it is a day old: a failed step keeps its logs there); returns what went."""
    import time

    gone = []
    folder = Path(folder)
    for leftover in folder.glob(".*.tmp") if folder.is_dir() else []:
        m = _TEMPORARY.match(leftover.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        try:
            if leftover.is_dir() and not leftover.is_symlink():
                if time.time() - leftover.stat().st_mtime < KEEP_FAILED_FOLDERS_SECONDS:
                    continue
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        except OSError:
            continue
        gone.append(leftover)
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def temporary_folder(target: Path | str) -> Path:
    """A new empty folder beside `target`, named as a temporary stand-in for it (the caller removes it)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target)
        return Path(tempfile.mkdtemp(prefix=temporary_prefix(target), suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise os_error(exc, "write", target) from None


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    An OSError (a full or read-only disk, a folder in the way) becomes a one-line TbpwError naming the file."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise os_error(exc, "write", target) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.filename is None or Path(exc.filename) == tmp_path:  # the user knows the target, not our stand-in
            raise os_error(OSError(exc.errno, exc.strerror, str(target)), "write") from None
        raise os_error(exc, "use") from None  # another file the block read or wrote: it names that one
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text(target: Path | str, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: Path | str, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def publish_folder(folder: Path | str, build: Callable[[Path], T], *, keep_existing: Callable[[], bool] = lambda: False) -> T:
    """Make `folder` with `build(staging)` in a staging folder beside it, then rename it into place (replacing
    an older one), so that a killed build never leaves a folder that looks complete. When
    `keep_existing()` says another process published a good one meanwhile, that one stays."""
    folder = Path(folder)
    staging = temporary_folder(folder)
    try:
        result = build(staging)
        if not keep_existing():
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        return result
    finally:
        if staging.exists():
            shutil.rmtree(staging)
