"""Pinned registry archives: download with pip (from a local index here), verify sha256, read members."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from tbpw.errors import TbpwError
from tbpw.files import digest, paths, pinned
from tbpw.llamacpp import sources

EXL_NAME, EXL_VERSION = "exllamav2", "0.3.2"
EXL_FILE = "exllamav2-0.3.2-py3-none-any.whl"
EXL_SHA = "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e"
WIKI_MEMBER = "exllamav2/conversion/standard_cal_data/wiki.utf8"


@pytest.fixture(scope="module")
def real_wheel() -> Path:
    """The pinned exllamav2 wheel, fetched once into the real cache (pip, sha256-checked)."""
    return pinned.fetch_pinned(pinned.PinnedArchive(EXL_NAME, EXL_VERSION, EXL_SHA, filename=EXL_FILE))


@pytest.fixture
def local_index(tmp_path: Path, real_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip sees only a folder holding the wheel: the download path runs for real, without the network."""
    index = tmp_path / "index"
    index.mkdir()
    shutil.copy(real_wheel, index / real_wheel.name)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("TBPW_HOME", str(tmp_path / "home"))
    return index


def test_fetch_downloads_with_pip_verifies_and_reuses(local_index: Path) -> None:
    pin = pinned.PinnedArchive(EXL_NAME, EXL_VERSION, EXL_SHA, filename=EXL_FILE)
    got = pinned.fetch_pinned(pin)
    assert got == paths.downloads() / EXL_FILE
    assert digest.sha256_file(got) == EXL_SHA
    # The cache is used from now on: with the index gone, the same pin still resolves.
    shutil.rmtree(local_index)
    assert pinned.fetch_pinned(pin) == got


def test_fetch_without_a_known_file_name_finds_the_archive_by_its_stem(local_index: Path) -> None:
    got = pinned.fetch_pinned(pinned.PinnedArchive(EXL_NAME, EXL_VERSION, EXL_SHA))
    assert got.name == EXL_FILE
    assert pinned.cached_archive(pinned.PinnedArchive(EXL_NAME, EXL_VERSION, EXL_SHA)) == got


def test_a_registry_file_that_does_not_match_the_pin_is_refused(local_index: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(TbpwError, match="does not match the pinned sha256") as err:
        pinned.fetch_pinned(pinned.PinnedArchive(EXL_NAME, EXL_VERSION, wrong, filename=EXL_FILE, pinned_in="vendor/x.toml"))
    assert "\n" not in str(err.value) and "vendor/x.toml" in str(err.value)
    assert not (paths.downloads() / EXL_FILE).exists()


def test_a_version_the_index_lacks_is_a_clear_error(local_index: Path) -> None:
    with pytest.raises(TbpwError, match=r"could not download exllamav2==9\.9\.9 .*place the file") as err:
        pinned.fetch_pinned(pinned.PinnedArchive(EXL_NAME, "9.9.9", EXL_SHA, filename="exllamav2-9.9.9-py3-none-any.whl"))
    assert "\n" not in str(err.value)


def test_a_cached_file_with_another_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TBPW_HOME", str(tmp_path))
    paths.downloads().mkdir(parents=True)
    (paths.downloads() / EXL_FILE).write_bytes(b"not the wheel")
    with pytest.raises(TbpwError, match=f"expected {EXL_SHA}.*delete the file"):
        pinned.fetch_pinned(pinned.PinnedArchive(EXL_NAME, EXL_VERSION, EXL_SHA, filename=EXL_FILE))


def test_a_malformed_pin_is_refused_at_once() -> None:
    with pytest.raises(TbpwError, match="not 64 lower-case hex digits"):
        pinned.PinnedArchive(EXL_NAME, EXL_VERSION, "ABC")


def test_members_are_read_from_a_wheel(real_wheel: Path, tmp_path: Path) -> None:
    text = pinned.read_member(real_wheel, WIKI_MEMBER).decode("utf-8")
    assert text.startswith("<doc id=") and text.count("</doc>") == 2349
    target = pinned.extract_member(real_wheel, WIKI_MEMBER, tmp_path / "out" / "wiki.utf8")
    assert target.read_text(encoding="utf-8") == text
    assert [p.name for p in target.parent.iterdir()] == ["wiki.utf8"]  # no temporary file left behind


def test_a_missing_member_names_where_a_file_of_that_name_lies(real_wheel: Path) -> None:
    with pytest.raises(TbpwError, match=r"has no file 'standard_cal_data/wiki\.utf8' \(a file of that name lies at exllamav2/conversion/standard_cal_data/wiki\.utf8\)"):
        pinned.read_member(real_wheel, "standard_cal_data/wiki.utf8")
    with pytest.raises(TbpwError, match="has no file 'nothing/here.txt': fix the path"):
        pinned.read_member(real_wheel, "nothing/here.txt")


def test_members_are_read_from_a_tar(tmp_path: Path) -> None:
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"hello from a tar\n"
        info = tarfile.TarInfo("pkg-1.0/data/hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert pinned.archive_members(archive) == ["pkg-1.0/data/hello.txt"]
    assert pinned.read_member(archive, "pkg-1.0/data/hello.txt") == b"hello from a tar\n"
    with pytest.raises(TbpwError, match="has no file 'hello.txt' \\(a file of that name lies at pkg-1.0/data/hello.txt\\)"):
        pinned.read_member(archive, "hello.txt")


def test_something_that_is_not_an_archive_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.whl"
    junk.write_text("plain text")
    with pytest.raises(TbpwError, match="neither a zip .* nor a tar"):
        pinned.read_member(junk, "x")


def test_the_llama_cpp_source_goes_through_the_same_fetch() -> None:
    src = sources.resolve("upstream")
    archive = sources.fetch_archive(src)
    assert archive == paths.downloads() / src.filename
    assert digest.sha256_file(archive) == src.sha256
