"""Pinned llama.cpp sources: read the lock file, fetch and verify a source, unpack what the build needs."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tbpw.errors import TbpwError
from tbpw.files import paths, pinned

LOCK_FILE = "llama-cpp.toml"

# Top-level folders of a llama.cpp tree that no build step reads: leaving them out makes the
# unpacked tree ~55 MB instead of ~176 MB.
UNNEEDED_DIRS = {"models", "docs", "examples", "tests", "benches", "media", ".github", ".devops"}


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "pypi-sdist", "git" or "path"
    build_number: int = 0
    build_commit: str = "unknown"
    package: str = ""
    filename: str = ""
    sha256: str = ""
    subdir: str = ""
    url: str = ""
    branch: str = ""
    commit: str = ""
    path: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def identity(self) -> str:
        """What makes two builds of this source the same (part of the build cache key)."""
        if self.kind == "pypi-sdist":
            return f"sdist:{self.sha256}"
        if self.kind == "git":
            return f"git:{self.commit}"
        return f"path:{self.path}:{tree_fingerprint(Path(self.path))}"


def load_lock(vendor: Path | None = None) -> tuple[str, dict[str, Source]]:
    lock = (vendor or paths.vendor_dir()) / LOCK_FILE
    if not lock.is_file():
        raise TbpwError(f"source lock file {lock} is missing: run tbpw from its source checkout or set TBPW_VENDOR")
    data = tomllib.loads(lock.read_text())
    known = {}
    for name, spec in data.get("sources", {}).items():
        fields = {k: v for k, v in spec.items() if k in Source.__dataclass_fields__}
        known[name] = Source(name=name, **fields)
    return data.get("default", "upstream"), known


def resolve(name_or_path: str | None) -> Source:
    """A source by lock-file name, or a local llama.cpp checkout by path."""
    default, known = load_lock()
    name_or_path = name_or_path or default
    if name_or_path in known:
        return known[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "CMakeLists.txt").is_file() or not (path / "include" / "llama.h").is_file():
            raise TbpwError(f"{path} is not a llama.cpp checkout (no CMakeLists.txt and include/llama.h): give its top folder")
        # a tree cut from a pinned source (e.g. carried to a machine without network) names its build
        origin = _origin(path)
        return Source(name=str(path.resolve()), kind="path", path=str(path.resolve()),
                      build_number=int(origin.get("build_number", 0)), build_commit=str(origin.get("build_commit", "unknown")),
                      description=str(origin.get("description", "local checkout")))
    raise TbpwError(f"unknown llama.cpp source {name_or_path!r}: use one of {', '.join(sorted(known))} or the path of a llama.cpp checkout")


ORIGIN_FILE = "tbpw-source.json"


def _origin(path: Path) -> dict:
    """What a source tree says it was cut from (ORIGIN_FILE: build_number, build_commit, description)."""
    try:
        data = json.loads((path / ORIGIN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TbpwError(f"{path / ORIGIN_FILE} is not readable JSON ({exc}): fix or delete it") from exc
    return data if isinstance(data, dict) else {}


def origin_of(src: Source) -> dict:
    """The ORIGIN_FILE content describing a tree of `src`."""
    return {"build_number": src.build_number, "build_commit": src.build_commit,
            "description": f"{src.name}: {src.description or src.identity}"}


def tree_fingerprint(root: Path) -> str:
    """A cheap content key of a local checkout: names, sizes and mtimes of the files the build reads."""
    digest = hashlib.sha256()
    for sub in ("CMakeLists.txt", "src", "ggml", "include", "common", "tools", "cmake", "vendor"):
        base = root / sub
        items = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []
        for p in items:
            st = p.stat()
            digest.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def fetch_archive(src: Source) -> Path:
    """Download the pinned archive once into the cache and check its sha256."""
    name, _, version = src.package.partition("==")
    pin = pinned.PinnedArchive(name=name, version=version, sha256=src.sha256, archive="sdist",
                                 filename=src.filename, pinned_in=f"vendor/{LOCK_FILE}")
    return pinned.fetch_pinned(pin)


def _unpack_sdist(src: Source, archive: Path, dest: Path) -> None:
    prefix = src.subdir.rstrip("/") + "/"
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix):]
            if not rel or rel.split("/", 1)[0] in UNNEEDED_DIRS:
                continue
            m = m.replace(name=rel, deep=False)
            members.append(m)
        tar.extractall(dest, members=members, filter="data")


def prepare(src: Source) -> Path:
    """Return a source tree ready for CMake, fetching and unpacking it into the cache when needed."""
    if src.kind == "path":
        return Path(src.path)
    key = src.identity.replace(":", "-")[:40]
    tree = paths.sources() / key
    if (tree / ".tbpw-complete").is_file():
        return tree
    if tree.exists():
        shutil.rmtree(tree)
    tree.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=tree.parent))
    try:
        if src.kind == "pypi-sdist":
            _unpack_sdist(src, fetch_archive(src), staging)
        elif src.kind == "git":
            _clone(src, staging)
        else:
            raise TbpwError(f"source {src.name} has unknown kind {src.kind!r} in vendor/{LOCK_FILE}")
        (staging / ORIGIN_FILE).write_text(json.dumps(origin_of(src)) + "\n")
        (staging / ".tbpw-complete").write_text(src.identity + "\n")
        staging.rename(tree)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return tree


def _clone(src: Source, dest: Path) -> None:
    if shutil.which("git") is None:
        raise TbpwError("git is not installed: install git to build the fork, or pass --source upstream")
    steps = [["git", "init", "-q", str(dest)],
             ["git", "-C", str(dest), "fetch", "-q", "--depth", "1", src.url, src.commit],
             ["git", "-C", str(dest), "checkout", "-q", "FETCH_HEAD"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TbpwError(f"could not fetch {src.url} at {src.commit}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'git failed'} (needs network access to GitHub)")
    head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head != src.commit:
        raise TbpwError(f"{src.url} gave commit {head}, expected {src.commit}: fix the pin in vendor/{LOCK_FILE}")
