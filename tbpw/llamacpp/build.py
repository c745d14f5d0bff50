"""Configure and build llama.cpp with CMake into a cache directory keyed by source, backend and options."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tbpw.errors import TbpwError
from tbpw.files import paths
from tbpw.files.atomic import write_json
from tbpw.files.lock import waiting_lock
from tbpw.llamacpp import progress, sources

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
LIBRARY_TARGETS = ("ggml-base",)
BACKENDS = ("auto", "cpu", "cuda", "metal", "vulkan")
# Bump when the way tbpw builds changes, so old cache entries are not mistaken for new ones.
BUILD_RECIPE_VERSION = 1
ACTIVE_FILE = "active.json"


@dataclass(frozen=True)
class BuildInfo:
    """A finished build in the cache (the content of its build.json)."""

    key: str
    root: Path
    source_name: str
    source_identity: str
    build_number: int
    build_commit: str
    backend: str
    cmake_flags: tuple[str, ...]
    seconds: float

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def log_path(self) -> Path:
        return self.root / "build.log"

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise TbpwError(f"{name} is missing from the build at {self.root}: run `tbpw build` again")
        return path

    def library(self, stem: str) -> Path:
        for suffix in (".so", ".dylib", ".dll"):
            for candidate in (self.bin_dir / f"lib{stem}{suffix}", self.bin_dir / f"{stem}{suffix}"):
                if candidate.exists():
                    return candidate
        raise TbpwError(f"lib{stem} is missing from the build at {self.root}: run `tbpw build` again")

    def to_json(self) -> dict:
        return {"key": self.key, "source_name": self.source_name, "source_identity": self.source_identity,
                "build_number": self.build_number, "build_commit": self.build_commit, "backend": self.backend,
                "cmake_flags": list(self.cmake_flags), "seconds": round(self.seconds, 1)}

    @classmethod
    def load(cls, root: Path) -> BuildInfo:
        try:
            data = json.loads((root / "build.json").read_text(encoding="utf-8"))
            return cls(key=data["key"], root=root, source_name=data["source_name"],
                       source_identity=data["source_identity"], build_number=data["build_number"],
                       build_commit=data["build_commit"], backend=data["backend"],
                       cmake_flags=tuple(data["cmake_flags"]), seconds=data.get("seconds", 0.0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TbpwError(f"the build record {root / 'build.json'} is damaged ({type(exc).__name__}): "
                            "run `tbpw build --force` to rebuild it") from None


def find_cmake() -> str:
    # Prefer the cmake installed with tbpw's own environment (the PyPI wheel), then the system one.
    beside = Path(sys.executable).parent / "cmake"
    if beside.is_file():
        return str(beside)
    found = shutil.which("cmake")
    if not found:
        raise TbpwError("cmake was not found: `pip install cmake` in tbpw's environment, or install it from your system packages")
    return found


def find_compilers() -> tuple[str, str]:
    """The C and C++ compilers CMake will use ($CC/$CXX, else cc/c++ on PATH), checked before any work starts."""
    found = []
    for env, defaults in (("CC", ("cc", "gcc", "clang")), ("CXX", ("c++", "g++", "clang++"))):
        wanted = os.environ.get(env)
        candidates = [wanted] if wanted else list(defaults)
        path = next((shutil.which(c) for c in candidates if shutil.which(c)), None)
        if path is None:
            what = f"${env}={wanted}" if wanted else " / ".join(defaults)
            raise TbpwError(f"no {'C' if env == 'CC' else 'C++'} compiler found ({what}): install one "
                            f"(Debian/Ubuntu: apt-get install build-essential) or set {env} to its path")
        found.append(path)
    return found[0], found[1]


def detect_backend(requested: str) -> str:
    if requested not in BACKENDS:
        raise TbpwError(f"unknown backend {requested!r}: use one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    if shutil.which("nvcc") and shutil.which("nvidia-smi"):
        return "cuda"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "metal"
    return "cpu"


def cuda_architectures() -> str:
    """Compute capabilities of the visible GPUs (e.g. '90'), falling back to CMake's native detection."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
        caps = sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})
        if caps:
            return ";".join(caps)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "native"


def cmake_flags(src: sources.Source, backend: str) -> list[str]:
    flags = [
        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_CCACHE=OFF",
        f"-DLLAMA_BUILD_NUMBER={src.build_number}", f"-DLLAMA_BUILD_COMMIT={src.build_commit}",
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DCMAKE_INSTALL_RPATH=@loader_path" if platform.system() == "Darwin" else "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    ]
    if backend == "cuda":
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures()}"]
    elif backend == "metal":
        flags += ["-DGGML_METAL=ON"]
    elif backend == "vulkan":
        flags += ["-DGGML_VULKAN=ON"]
    return flags


def build_key(src: sources.Source, backend: str, flags: list[str]) -> str:
    blob = json.dumps({"recipe": BUILD_RECIPE_VERSION, "source": src.identity, "backend": backend, "flags": flags,
                       "machine": platform.machine(), "system": platform.system()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def active_build() -> BuildInfo:
    """The build that tbpw's tools and bridge use: $TBPW_BUILD (a build folder), else the last `tbpw build`."""
    if env := os.environ.get("TBPW_BUILD"):
        root = Path(env)
        if not (root / "build.json").is_file():
            raise TbpwError(f"TBPW_BUILD={env} is not a tbpw build folder (no build.json): unset it or run `tbpw build`")
        return BuildInfo.load(root)
    pointer = paths.builds() / ACTIVE_FILE
    if not pointer.is_file():
        raise TbpwError("llama.cpp is not built yet: run `tbpw build` first")
    try:
        key = json.loads(pointer.read_text(encoding="utf-8"))["key"]
        if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]+", key):
            raise ValueError(key)
    except (OSError, ValueError, KeyError, TypeError):
        raise TbpwError(f"{pointer}, which names the active build, is damaged: run `tbpw build` again") from None
    root = paths.builds() / key
    if not (root / "build.json").is_file():
        raise TbpwError(f"the active build {root} is gone: run `tbpw build` again")
    return BuildInfo.load(root)


def build(source: str | None = None, backend: str = "auto", jobs: int | None = None, force: bool = False) -> BuildInfo:
    """Build (or find in the cache) the llama.cpp tools, and make that build the active one.

    tbpw's own collector is compiled against it by `tbpw.llamacpp.collector.install`."""
    src = sources.resolve(source)
    backend = detect_backend(backend)
    flags = cmake_flags(src, backend)
    key = build_key(src, backend, flags)
    root = paths.builds() / key
    if not force and (root / "build.json").is_file():
        info = BuildInfo.load(root)
        _activate(info)
        return info
    cmake = find_cmake()  # before anything is written: a missing tool says so at once
    cc, cxx = find_compilers()
    # One build of a key at a time; whoever waited finds the other's finished build.
    with waiting_lock(paths.builds() / f".{key}.lock",
                      note=lambda line: print(f"note: {line}", file=sys.stderr)):
        if not force and (root / "build.json").is_file():
            info = BuildInfo.load(root)
            _activate(info)
            return info
        return _build(src, backend, flags, key, root, jobs, (cmake, cc, cxx))


def _build(src: sources.Source, backend: str, flags: list[str], key: str, root: Path, jobs: int | None,
           tools: tuple[str, str, str]) -> BuildInfo:
    cmake, cc, cxx = tools
    tree = sources.prepare(src)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "build.log"
    work = root / "cmake-build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = dict(os.environ, CC=cc, CXX=cxx)
    start = time.monotonic()
    with open(log_path, "w") as log:
        _run_logged([cmake, "-S", str(tree), "-B", str(work), *generator, *flags], log, log_path, env, "configure")
        targets = [*TOOLS, *LIBRARY_TARGETS]
        _run_logged([cmake, "--build", str(work), "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
                     "--target", *targets], log, log_path, env, "build",
                    progress.BUILD if generator else progress.BUILD_MAKE)
    staging = root / "bin.partial"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(work / "bin", staging, symlinks=True)
    if (root / "bin").exists():
        shutil.rmtree(root / "bin")
    staging.rename(root / "bin")
    shutil.rmtree(work, ignore_errors=True)
    info = BuildInfo(key=key, root=root, source_name=src.name, source_identity=src.identity,
                     build_number=src.build_number, build_commit=src.build_commit, backend=backend,
                     cmake_flags=tuple(flags), seconds=time.monotonic() - start)
    for tool in TOOLS:
        info.tool(tool)
    write_json(root / "build.json", info.to_json())  # written last: its presence marks a complete build
    _activate(info)
    return info


def _activate(info: BuildInfo) -> None:
    write_json(paths.builds() / ACTIVE_FILE, {"key": info.key})


def _run_logged(cmd: list[str], log, log_path: Path, env: dict, what: str, meter: progress.Meter | None = None) -> None:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    with progress.track("llama.cpp", meter) as tracker:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if tracker is not None:
                tracker.feed("stdout", line)
        proc.wait()
        if tracker is not None:
            tracker.ok = proc.returncode == 0
    log.flush()
    if proc.returncode != 0:
        raise TbpwError(f"llama.cpp {what} failed (exit {proc.returncode}); full log: {log_path}",
                        details=tail(log_path, 15))


def tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])
