"""tbpw's own activation collector (vendor/native/collector): compile it against a build, and run it.

The collector is one C++ file written against llama.cpp's public headers. It is compiled straight into
the build's bin/ (next to libllama and libggml, found through an $ORIGIN rpath), so it is run like any
other tool of the build. Its source hash is kept in the build's build.json: a changed collector is
recompiled (a couple of seconds) without rebuilding llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tbpw.errors import TbpwError
from tbpw.files import paths
from tbpw.files.atomic import write_json
from tbpw.files.lock import waiting_lock
from tbpw.llamacpp import progress
from tbpw.llamacpp.build import BuildInfo, active_build, build, find_compilers
from tbpw.llamacpp.tools import ToolRun, run_tool

NAME = "tbpw-collector"
SOURCES = ("collector.cpp",)
# The public headers the collector includes (and those they include in turn).
HEADERS = {"include": ("llama.h",),
           "ggml/include": ("ggml.h", "ggml-backend.h", "ggml-alloc.h", "ggml-cpu.h", "ggml-opt.h", "gguf.h")}
CXX_FLAGS = ("-std=c++17", "-O2", "-DNDEBUG")
LIBRARIES = ("-lllama", "-lggml", "-lggml-base")
# Bump when the way the collector is compiled changes in a way its sources do not show.
RECIPE_VERSION = 1
BUILD_KEY = "collector"  # the entry in build.json


def source_dir() -> Path:
    return paths.vendor_dir() / "native" / "collector"


def source_hash() -> str:
    """What identifies a compiled collector: its sources and the compile recipe."""
    digest = hashlib.sha256(json.dumps({"recipe": RECIPE_VERSION, "flags": CXX_FLAGS, "libs": LIBRARIES}).encode())
    for name in SOURCES:
        path = source_dir() / name
        if not path.is_file():
            raise TbpwError(f"the collector source {path} is missing: run tbpw from its source checkout or set TBPW_VENDOR")
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def is_current(info: BuildInfo) -> bool:
    recorded = _build_json(info.root).get(BUILD_KEY, {})
    return recorded.get("hash") == source_hash() and (info.bin_dir / NAME).is_file()


def ensure_built(info: BuildInfo | None = None, tree: Path | None = None) -> Path:
    """Compile the collector into `info`'s bin/ unless the one there is built from the current sources.

    `tree` is the llama.cpp source tree of the build (for its headers); without it the headers are taken
    from the build folder, where the first compile leaves a copy, or else from the source cache.
    """
    info = info or active_build()
    exe = info.bin_dir / NAME
    if is_current(info):
        return exe
    # one compile at a time: whoever waited finds the collector the other one compiled
    with waiting_lock(info.root / f".{NAME}.lock", note=lambda line: print(f"note: {line}", file=sys.stderr)):
        if is_current(info):
            return exe
        return _compile(info, tree)


def _compile(info: BuildInfo, tree: Path | None) -> Path:
    exe = info.bin_dir / NAME
    if platform.system() == "Windows":
        raise TbpwError("the tbpw collector is not built on Windows yet: use --collector stock")
    include = _headers(info, tree)
    _, cxx = find_compilers()
    log_path = info.root / "collector.log"
    partial = info.bin_dir / f".{NAME}.partial"
    rpath = "@loader_path" if platform.system() == "Darwin" else "$ORIGIN"
    cmd = [cxx, *CXX_FLAGS, "-o", str(partial), *(str(source_dir() / s) for s in SOURCES),
           f"-I{include}", f"-L{info.bin_dir}", *LIBRARIES, f"-Wl,-rpath,{rpath}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    log_path.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        raise TbpwError(f"compiling {NAME} failed (exit {proc.returncode}); full log: {log_path}", details=tail)
    os.replace(partial, exe)
    data = _build_json(info.root)
    data[BUILD_KEY] = {"hash": source_hash(), "compiler": cxx, "seconds": round(time.monotonic() - start, 1)}
    write_json(info.root / "build.json", data)
    return exe


def run_collector(args: Sequence[str | os.PathLike], *, log_path: Path | str | None = None,
                  build: BuildInfo | None = None, timeout: float | None = None,
                  meter: progress.Meter | None = None, cwd: Path | None = None) -> ToolRun:
    """Run the collector of the active build (compiling it first when its sources changed), in `cwd` when given."""
    build = build or active_build()
    ensure_built(build)
    return run_tool(NAME, args, log_path=log_path, build=build, timeout=timeout, meter=meter, cwd=cwd)


def _build_json(root: Path) -> dict:
    try:
        return json.loads((root / "build.json").read_text())
    except (OSError, ValueError):
        return {}


def _headers(info: BuildInfo, tree: Path | None) -> Path:
    """A folder holding the build's public headers, copied into the build folder once."""
    kept = info.root / "include"
    if tree is None and all((kept / name).is_file() for names in HEADERS.values() for name in names):
        return kept
    if tree is None:
        from tbpw.llamacpp import sources

        tree = sources.prepare(sources.resolve(info.source_name))
    staging = info.root / ".include.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for sub, names in HEADERS.items():
        for name in names:
            src = tree / sub / name
            if not src.is_file():
                raise TbpwError(f"{src} is missing: the llama.cpp tree of build {info.key} lacks a public header "
                                f"the collector needs; run `tbpw build --force`")
            shutil.copy2(src, staging / name)
    shutil.rmtree(kept, ignore_errors=True)
    staging.rename(kept)
    return kept


def compile_or_warn(info: BuildInfo) -> None:
    """Compile the collector when its sources changed. A llama.cpp whose public API it does not compile
    against still gives usable tools: warn, and let `--collector tbpw` report the error when asked for."""
    try:
        ensure_built(info)
    except TbpwError as exc:
        print(f"warning: {exc}; the stock imatrix collector still works", file=sys.stderr)


def install(source: str | None = None, backend: str = "auto", jobs: int | None = None, force: bool = False) -> BuildInfo:
    """What `tbpw build` does: the llama.cpp tools (cached), then tbpw's collector against them."""
    info = build(source, backend, jobs, force=force)
    compile_or_warn(info)
    return info
