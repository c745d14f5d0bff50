"""Content hashes of files, and a memo that re-hashes a file whenever anything about it may have changed.

`content_sha256` trusts a remembered hash only while the file's (device, inode, size, mtime, ctime) are all
the same: a file replaced by another of the same size and mtime has a new inode or ctime (setting the mtime
back changes the ctime), so it is hashed again. The memo lives in the cache (`digests.json`); losing it only
costs a re-hash. Only files of MEMO_MIN_BYTES or more are remembered: a smaller one hashes faster than the memo
is rewritten, and a run hashes many small ones (stage records, tables, logs).

`PerFile` keeps what a process read from a file (a parsed header, a loaded imatrix) under the same rule.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from tbpw.errors import TbpwError
from tbpw.files import paths

MEMO_FILE = "digests.json"
MEMO_ENTRIES = 20_000  # the most recent ones are kept
MEMO_MIN_BYTES = 16 << 20

_memo: dict[str, list] | None = None


def sha256_file(path: Path | str) -> str:
    """The sha256 of a file's content, read in blocks (models run to tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def identity(path: Path | str) -> list[int]:
    """What must stay the same for a remembered hash to count: device, inode, size, mtime and ctime (ns)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


T = TypeVar("T")


class PerFile(Generic[T]):
    """What this process made from a file, kept while the file's `identity` is unchanged: the `keep` most recent
    files' values. A run opens the same model and imatrix for every plan it writes; reading them again is most of
    the cost of a plan."""

    def __init__(self, keep: int):
        self.keep = keep
        self._values: dict[tuple[str, tuple[int, ...]], T] = {}

    def get(self, path: Path | str, make: Callable[[], T]) -> T:
        key = (str(Path(path).resolve()), tuple(identity(path)))
        if key not in self._values:
            value = make()
            while len(self._values) >= self.keep:
                del self._values[next(iter(self._values))]
            self._values[key] = value
        return self._values[key]


def content_sha256(path: Path | str) -> str:
    """sha256 of the file's content, remembered while its `identity` is unchanged."""
    key = str(Path(path).resolve())
    stamp = identity(key)
    if stamp[2] < MEMO_MIN_BYTES:
        return sha256_file(key)
    memo = _load()
    known = memo.get(key)
    if isinstance(known, list) and known[:-1] == stamp:
        return str(known[-1])
    value = sha256_file(key)
    if identity(key) == stamp:  # not changed while it was read
        memo.pop(key, None)
        memo[key] = [*stamp, value]
        _save(memo)
    return value


def remember(path: Path | str, sha256: str) -> None:
    """Remember the hash a writer computed while writing `path` (its content now), so that the first check after
    it costs no re-read."""
    key = str(Path(path).resolve())
    try:
        stamp = identity(key)
    except OSError:
        return  # gone already: nothing to remember
    if stamp[2] < MEMO_MIN_BYTES:
        return
    memo = _load()
    memo.pop(key, None)
    memo[key] = [*stamp, sha256]
    _save(memo)


def _memo_path() -> Path:
    return paths.home() / MEMO_FILE


def _load() -> dict[str, list]:
    global _memo
    if _memo is None:
        _memo = _read(_memo_path())
    return _memo


def _read(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}


def _save(memo: dict[str, list]) -> None:
    from tbpw.files.atomic import write_json

    path = _memo_path()
    # Another process may have remembered other files meanwhile: keep theirs too.
    merged = {**_read(path), **memo}
    trimmed = dict(list(merged.items())[-MEMO_ENTRIES:])
    try:
        write_json(path, trimmed)
    except (OSError, TbpwError):
        pass  # a read-only cache: hashes are simply computed again next time
    memo.clear()
    memo.update(trimmed)
