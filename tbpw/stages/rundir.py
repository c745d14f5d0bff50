"""The run directory: one folder per stage, each with a manifest of what produced it and what it holds.

A run directory belongs to tbpw: `tbpw run` writes only into a folder that is absent, empty, or marked by
`.tbpw-run.json` as one it made, so it never replaces a user's files; and one run at a time holds it
(`.tbpw-run.lock`: a second run is refused with the first one's pid).

A stage is a function that writes its outputs into a fresh folder and returns a JSON-able result. Its key
hashes the stage name, its options, the content of its input files and the llama.cpp build. A finished
stage is skipped only when its key matches, its manifest holds the result it recorded (`result_sha256`) AND every
output its manifest recorded is still there with the same size and content; otherwise it runs again (a deleted or truncated output is recomputed, not an
error). A killed stage leaves only a `.partial` folder that the next run discards. The manifest is written
last, so a folder without one never counts as finished.

An output may be *released* (`RunDir.release`, what `keep: chosen` does with the quants nobody keeps): the file
goes, its manifest keeps its size and sha256 and lists it as released. The stage still counts as finished, and a
stage keyed by that file keeps its key (its fingerprint is the recorded one), so a rerun skips both; a stage that
would have to run with a released file as input is refused with the command that makes the file again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbpw.errors import Interrupted, TbpwError, os_error
from tbpw.files.atomic import write_json
from tbpw.files.digest import content_sha256
from tbpw.files.lock import FileLock, refuse_if_locked
from tbpw.version import __version__

MANIFEST = "manifest.json"
MARKER = ".tbpw-run.json"  # this folder is a tbpw run directory
LOCK = ".tbpw-run.lock"
LEGACY_MARKER = ".fingerprints.json"  # what run directories made before the marker held
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    return obj


def result_sha256(result: Any) -> str:
    """The hash a manifest records of its stage's result (checked whenever the manifest is read)."""
    return hashlib.sha256(json.dumps(_canonical(result), sort_keys=True).encode()).hexdigest()


def is_run_dir(root: Path) -> bool:
    return (root / MARKER).is_file() or (root / LEGACY_MARKER).is_file()


def ownership_problem(root: Path | str) -> str | None:
    """Why tbpw may not write its run into `root`, or None: it must be absent, empty or a tbpw run directory,
    and writable (or creatable)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        return f"output_dir {root} is a file, not a folder: give a folder for the run"
    if root.is_dir():
        if not is_run_dir(root):
            try:
                found = sorted(p.name for p in root.iterdir())
            except OSError as exc:
                return str(os_error(exc, "read the output_dir", root))
            if found:
                shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
                return (f"output_dir {root} holds files tbpw did not make ({shown}): give a new or empty folder "
                        "(tbpw writes a run only into a folder it made, so that it never replaces your files)")
        if not os.access(root, os.W_OK | os.X_OK):
            return f"output_dir {root} is not writable: choose a writable folder or fix its permissions"
        return None
    parent = root.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create output_dir {root}: {parent} is not a writable folder; choose another output_dir"
    return None


@dataclass(frozen=True)
class StageOutcome:
    name: str
    folder: Path
    result: dict
    skipped: bool
    seconds: float

    def path(self, relative: str) -> Path:
        return self.folder / relative


class RunDir:
    """A run directory claimed by this process: marked as tbpw's, locked until `close()`.

    A worker that runs one stage of a run someone else claimed opens it with `claim=False`: it neither takes the
    lock nor clears leftovers (the driver did, and other workers' stages may be under way beside it)."""

    def __init__(self, root: Path | str, *, claim: bool = True):
        self.root = Path(root)
        self._lock: FileLock | None = None
        if not claim:
            if not (self.root / MARKER).is_file():
                raise TbpwError(f"{self.root} is not a tbpw run directory on this node: put the run directory on "
                                "storage every node sees (docs/distributed.md)")
            return
        if problem := ownership_problem(self.root):
            raise TbpwError(problem)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, "create the output_dir", self.root) from None
        self._lock = FileLock(self.root / LOCK)
        refuse_if_locked(self._lock, f"output_dir {self.root}",
                         "wait for that run to finish, or give this one another output_dir")
        if not (self.root / MARKER).is_file():
            write_json(self.root / MARKER, {"tbpw": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self._discard_leftovers()

    def close(self) -> None:
        """Release the run directory for the next run."""
        if self._lock is not None:
            self._lock.release()

    def _discard_leftovers(self) -> None:
        # Stages killed before they finished (ours: we hold the lock, nobody else writes here).
        for leftover in [*self.root.glob(".*.partial"), *self.root.glob(".*.old")]:
            shutil.rmtree(leftover, ignore_errors=True)

    def folder(self, stage: str) -> Path:
        if not STAGE_NAME.match(stage):
            raise TbpwError(f"stage name {stage!r} is not a plain name: use letters, digits and . _ + = - "
                            "(it names a folder of the run directory)")
        return self.root / stage

    def manifest(self, stage: str) -> dict | None:
        """The stage's manifest, or None when there is none or it is damaged (the stage then runs again): its result
        must be the one it recorded (`result_sha256`), so an edited number never reaches a report."""
        path = self.folder(stage) / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
            return None
        if data.get("result_sha256") != result_sha256(data["result"]):
            print(f"note: the manifest of stage {stage} in {self.root} does not hold the result it recorded: the "
                  "stage runs again", file=sys.stderr, flush=True)
            return None
        return data

    def finished(self) -> list[str]:
        """The stages with a manifest, in name order."""
        return sorted(p.parent.name for p in self.root.glob(f"*/{MANIFEST}"))

    def fingerprint(self, path: Path) -> str:
        """sha256 of a file's content (of every file, for a folder), re-hashed whenever the file may have changed;
        a released output's recorded sha256."""
        path = Path(path)
        if (released := self.released(path)) is not None:
            return released
        try:
            if path.is_dir():
                digest = hashlib.sha256()
                for item in sorted(p for p in path.rglob("*") if p.is_file()):
                    digest.update(f"{item.relative_to(path)}:{content_sha256(item)}\n".encode())
                return digest.hexdigest()
            return content_sha256(path)
        except OSError as exc:
            raise os_error(exc, "read the stage input", path) from None

    def key(self, stage: str, inputs: Mapping[str, Path], options: Any) -> str:
        blob = json.dumps({"stage": stage, "options": _canonical(options),
                           "inputs": {name: self.fingerprint(p) for name, p in sorted(inputs.items())}},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def released(self, path: Path) -> str | None:
        """The recorded sha256 of `path` when it is a stage output that `release` deleted, else None."""
        path = Path(path)
        if path.exists() or path.parent.parent != self.root:
            return None
        manifest = self.manifest(path.parent.name)
        if manifest is None or path.name not in manifest.get("released", []):
            return None
        recorded = manifest.get("outputs", {}).get(path.name)
        return recorded.get("sha256") if isinstance(recorded, dict) else None

    def release(self, path: Path) -> bool:
        """Delete a finished stage's output file, keeping the stage finished (see the module's note); False when
        it was released before."""
        path = Path(path)
        stage, relative = path.parent.name, path.name
        manifest = self.manifest(stage) if path.parent.parent == self.root else None
        if manifest is None or relative not in manifest.get("outputs", {}):
            raise TbpwError(f"{path} is no output of a finished stage of {self.root}: only those can be released")
        released = manifest.setdefault("released", [])
        if relative in released:
            return False
        released.append(relative)
        # The manifest first: killed between the two, the file is still there and still intact.
        write_json(path.parent / MANIFEST, manifest)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise os_error(exc, "delete", path) from None
        return True

    def _outputs(self, folder: Path) -> dict[str, dict[str, Any]]:
        return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": content_sha256(p)}
                for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}

    def _intact(self, folder: Path, manifest: dict) -> bool:
        """Every output the manifest recorded is there, with its size and content."""
        recorded = manifest.get("outputs")
        if not isinstance(recorded, dict):
            return False  # made before outputs were recorded: nothing proves they are the same
        released = manifest.get("released", [])
        for relative, expected in recorded.items():
            path = folder / relative
            if relative in released and not path.exists():
                continue
            try:
                if (not path.is_file() or path.stat().st_size != expected["bytes"]
                        or content_sha256(path) != expected["sha256"]):
                    return False
            except (OSError, KeyError, TypeError):
                return False
        return True

    def run(self, stage: str, inputs: Mapping[str, Path], options: Any, body: Callable[[Path], dict],
            force: bool = False) -> StageOutcome:
        """Run `body(folder)` unless a finished, intact stage with the same key exists; returns its result."""
        folder = self.folder(stage)
        key = self.key(stage, inputs, options)
        manifest = self.manifest(stage)
        if manifest and manifest.get("key") == key and not force and self._intact(folder, manifest):
            return StageOutcome(stage, folder, manifest["result"], True, 0.0)
        for path in inputs.values():
            if self.released(path) is not None:
                raise TbpwError(f"stage {stage} needs {path}, which was deleted after its evaluation (keep: chosen): "
                                f"run again with --force {Path(path).parent.name} to make it again, or set keep: all")
        partial = self.root / f".{stage}.partial"
        try:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        except OSError as exc:
            raise os_error(exc, "write", partial) from None
        start = time.monotonic()
        try:
            result = body(partial)
        except (KeyboardInterrupt, Interrupted):  # Ctrl-C, or a stage that turned it into its own Interrupted
            shutil.rmtree(partial, ignore_errors=True)  # a failure keeps its logs there; an interruption, nothing
            raise
        seconds = time.monotonic() - start
        old = self.root / f".{stage}.old"
        try:
            if old.exists():
                shutil.rmtree(old)
            if folder.exists():
                os.replace(folder, old)
            os.replace(partial, folder)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise os_error(exc, "write", folder) from None
        # The manifest goes in last, after the folder is in place: the outputs it records are hashed where they stay.
        write_json(folder / MANIFEST, {"stage": stage, "key": key, "options": _canonical(options),
                                       "inputs": {n: str(p) for n, p in sorted(inputs.items())},
                                       "outputs": self._outputs(folder),
                                       "result": _canonical(result), "result_sha256": result_sha256(result),
                                       "seconds": round(seconds, 2),
                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return StageOutcome(stage, folder, _canonical(result), False, seconds)
