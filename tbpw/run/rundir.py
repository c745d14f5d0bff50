"""The run directory: one folder per stage, each with a manifest of what produced it.

A stage is a function that writes its outputs into a fresh folder and returns a JSON-able result.
Its key hashes the stage name, its options, the content of its input files and the llama.cpp build;
a finished stage whose key matches is skipped, a changed input reruns it, and a killed stage leaves
only a `.partial` folder that the next run discards. The manifest is written last, so a folder without
one never counts as finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbpw.files.atomic import write_json

MANIFEST = "manifest.json"
FINGERPRINTS = ".fingerprints.json"


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
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._fingerprints: dict[str, list] = {}
        fp_file = self.root / FINGERPRINTS
        if fp_file.is_file():
            try:
                self._fingerprints = json.loads(fp_file.read_text())
            except json.JSONDecodeError:
                self._fingerprints = {}

    def folder(self, stage: str) -> Path:
        return self.root / stage

    def manifest(self, stage: str) -> dict | None:
        path = self.folder(stage) / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def fingerprint(self, path: Path) -> str:
        """sha256 of a file's content (of every file, for a folder), memoised by (size, mtime)."""
        path = Path(path)
        if path.is_dir():
            digest = hashlib.sha256()
            for item in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{item.relative_to(path)}:{self.fingerprint(item)}\n".encode())
            return digest.hexdigest()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        cached = self._fingerprints.get(str(path.resolve()))
        if cached and cached[:2] == stamp:
            return cached[2]
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        self._fingerprints[str(path.resolve())] = [*stamp, digest.hexdigest()]
        write_json(self.root / FINGERPRINTS, self._fingerprints)
        return digest.hexdigest()

    def key(self, stage: str, inputs: Mapping[str, Path], options: Any) -> str:
        blob = json.dumps({"stage": stage, "options": _canonical(options),
                           "inputs": {name: self.fingerprint(p) for name, p in sorted(inputs.items())}},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def run(self, stage: str, inputs: Mapping[str, Path], options: Any, body: Callable[[Path], dict],
            force: bool = False) -> StageOutcome:
        """Run `body(folder)` unless a finished stage with the same key exists; returns its result."""
        key = self.key(stage, inputs, options)
        folder = self.folder(stage)
        manifest = self.manifest(stage)
        if manifest and manifest.get("key") == key and not force:
            return StageOutcome(stage, folder, manifest["result"], True, 0.0)
        partial = self.root / f".{stage}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        start = time.monotonic()
        result = body(partial)
        seconds = time.monotonic() - start
        write_json(partial / MANIFEST, {"stage": stage, "key": key, "options": _canonical(options),
                                        "inputs": {n: str(p) for n, p in sorted(inputs.items())},
                                        "result": _canonical(result), "seconds": round(seconds, 2),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        old = self.root / f".{stage}.old"
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            os.replace(folder, old)
        os.replace(partial, folder)
        shutil.rmtree(old, ignore_errors=True)
        return StageOutcome(stage, folder, _canonical(result), False, seconds)
