"""Keep the last lines of llama.cpp tool output: preload a tiny library that flushes its log at exit.

llama.cpp's tools log through a worker thread that is never joined at exit, so the final lines (PPL,
the KL-divergence blocks, task scores) are lost now and then -- measured here: 36 of 60 concurrent
llama-perplexity runs lost `Final estimate`; with the preload, 0 of 60. `vendor/native/flush_logs.c` joins
that thread from an atexit handler. It is compiled once per machine into the cache with the C compiler
that built llama.cpp; without a compiler the tools run unprotected.

Set TBPW_NO_LOG_FLUSH=1 to run the tools without it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tbpw.files import paths

DISABLE_ENV = "TBPW_NO_LOG_FLUSH"
_PRELOAD_VAR = {"Linux": "LD_PRELOAD", "Darwin": "DYLD_INSERT_LIBRARIES"}


def shim() -> tuple[Path | None, str]:
    """(path of the compiled library or None, why not); compiled on first use under the cache root."""
    system = platform.system()
    if system not in _PRELOAD_VAR:
        return None, f"not supported on {system}"
    source = paths.vendor_dir() / "native" / "flush_logs.c"
    if not source.is_file():
        return None, f"{source} is missing"
    code = source.read_bytes()
    suffix = ".dylib" if system == "Darwin" else ".so"
    key = hashlib.sha256(code + platform.machine().encode()).hexdigest()[:12]
    target = paths.home() / "native" / f"flush_logs-{key}{suffix}"
    if target.is_file():
        return target, "ok"
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if not cc or not shutil.which(cc):
        return None, "no C compiler to build it"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".flush_logs-", suffix=suffix, dir=target.parent)
    os.close(fd)
    flags = ["-dynamiclib"] if system == "Darwin" else ["-shared", "-fPIC"]
    proc = subprocess.run([cc, *flags, "-O2", "-o", tmp, str(source), *([] if system == "Darwin" else ["-ldl"])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        lines = (proc.stderr.strip() or proc.stdout.strip() or "compiler failed").splitlines()
        return None, f"compiling it failed: {lines[-1]}"
    os.replace(tmp, target)
    return target, "ok"


def preload_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment entries that preload the flush library (empty when it is unavailable or disabled)."""
    env: Mapping[str, str] = os.environ if base is None else base
    if env.get(DISABLE_ENV, "") not in ("", "0"):
        return {}
    path, _ = shim()
    if path is None:
        return {}
    var = _PRELOAD_VAR[platform.system()]
    existing = env.get(var, "")
    return {var: f"{path}:{existing}" if existing else str(path)}


def status() -> dict[str, str | bool | None]:
    """For `tbpw doctor`: whether tool output is protected, and the library's path or the reason it is not."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return {"active": False, "path": None, "reason": f"disabled by {DISABLE_ENV}"}
    path, reason = shim()
    return {"active": path is not None, "path": str(path) if path else None, "reason": reason}
