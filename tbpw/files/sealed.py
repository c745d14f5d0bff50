"""One rule for everything tbpw reads back from its caches and run folders: an entry carries its size and its content
hash, recorded when it was made (a `.seal` file beside it), and is checked when it is read. A damaged, cut or
unrecorded entry is discarded, with one line saying which and why, and its owner makes it again: nothing tbpw wrote
is trusted because it is there.

The check costs a `stat` and a look-up while the file's identity (device, inode, size, mtime, ctime) is what the
seal saw: the writer records the hash it computed while writing (`write_seal(path, sha256=...)`), and
`tbpw.files.digest` remembers it for that identity. Any write to the file changes its ctime, which no user can set
back, so a changed file is hashed again and found out (files under 16 MiB are hashed on every check: that takes
milliseconds).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from tbpw.files.atomic import write_json
from tbpw.files.digest import content_sha256, remember

SUFFIX = ".seal"
Note = Callable[[str], None]


def seal_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def write_seal(path: Path | str, sha256: str | None = None, size: int | None = None) -> None:
    """Record `path`'s size and content hash: those its writer counted while writing, else read now. (A writer
    that gives both needs the file no more: another process may have moved it on meanwhile.)"""
    path = Path(path)
    if sha256 is None or size is None:
        size, sha256 = path.stat().st_size, content_sha256(path)
    remember(path, sha256)
    write_json(seal_path(path), {"bytes": size, "sha256": sha256})


def problem(path: Path | str) -> str | None:
    """Why `path` cannot be trusted (missing, a folder, unrecorded, cut short, changed), or None when it is intact."""
    path = Path(path)
    if path.is_dir():
        return "it is a folder, not a file"
    try:
        size = path.stat().st_size
    except OSError:
        return "it is missing"
    try:
        recorded = json.loads(seal_path(path).read_text(encoding="utf-8"))
        expected, digest = int(recorded["bytes"]), str(recorded["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no record of its size and hash (cut short while written, or made before tbpw kept one)"
    if size != expected:
        return f"it is {size} bytes, {expected} were written"
    if content_sha256(path) != digest:
        return "its content is not what was written (its sha256 differs)"
    return None


def discard(path: Path | str) -> None:
    """Remove an entry (a file, or whatever took its place) and its seal."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    seal_path(path).unlink(missing_ok=True)


def trusted(path: Path | str, what: str, note: Note | None = None) -> bool:
    """True when `path` is intact. A damaged entry is discarded with one line (`note`, else stderr) and False is
    returned, so that its owner makes it again; a missing one is just False."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        seal_path(path).unlink(missing_ok=True)
        return False
    why = problem(path)
    if why is None:
        return True
    discard(path)
    (note or _stderr)(f"note: discarded the damaged {what} {path} ({why}); it is made again")
    return False


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
