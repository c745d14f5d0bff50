"""Failures end in one clear line: a wrong sha256, a missing or broken compiler, a failed tool run.
And a second `tbpw build` is answered from the cache at once."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.errors import TbpwError
from tbpw.files import paths
from tbpw.llamacpp import sources
from tbpw.llamacpp.tools import run_tool

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None):
    from tbpw.cli import main

    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def error_line(output: str) -> str:
    """The `error: ...` line of a failed command, checked to be the first line."""
    first = output.splitlines()[0]
    assert first.startswith("error: "), output
    return first


@pytest.fixture
def isolated_home(tmp_path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def _real_archive() -> Path:
    _, known = sources.load_lock()
    archive = paths.downloads() / known["upstream"].filename
    if not archive.is_file():
        pytest.fail(f"{archive} is missing: run `tbpw build` once (it downloads the pinned source)")
    return archive


@pytest.mark.tools  # reads the source archive `tbpw build` downloaded
def test_wrong_sha256_is_one_clear_line(tmp_path, isolated_home):
    archive = _real_archive()
    vendor = tmp_path / "vendor"
    shutil.copytree(REPO / "vendor", vendor)
    lock = vendor / sources.LOCK_FILE
    real_sha = sources.load_lock()[1]["upstream"].sha256
    wrong = "0" * 64
    lock.write_text(lock.read_text().replace(real_sha, wrong))
    (isolated_home / "downloads").mkdir()
    (isolated_home / "downloads" / archive.name).symlink_to(archive)  # nothing is downloaded

    result = run_cli("build", "--backend", "cpu",
                     env={"TBPW_HOME": str(isolated_home), "TBPW_VENDOR": str(vendor), "TBPW_BUILD": None})
    assert result.exit_code == 2
    line = error_line(result.output)
    assert f"has sha256 {real_sha}, expected {wrong}" in line
    assert "delete the file to download it again, or fix the pin" in line
    assert len(result.output.strip().splitlines()) == 1
    assert not (isolated_home / "sources").exists() or not any((isolated_home / "sources").iterdir())


def test_missing_compiler_fails_before_any_work(isolated_home):
    result = run_cli("build", "--backend", "cpu",
                     env={"TBPW_HOME": str(isolated_home), "CC": "/nonexistent", "TBPW_BUILD": None})
    assert result.exit_code == 2
    assert error_line(result.output) == ("error: no C compiler found ($CC=/nonexistent): install one "
                                         "(Debian/Ubuntu: apt-get install build-essential) or set CC to its path")
    # Nothing was fetched, unpacked or configured.
    assert not any(p for p in isolated_home.rglob("*") if p.is_file())


def test_broken_compiler_gives_the_log_tail_and_path(tmp_path, isolated_home):
    """A compiler that exists but fails: CMake's configure stops, and the error names the log."""
    if shutil.which("cmake") is None and not (Path(sys.executable).parent / "cmake").is_file():
        pytest.fail("cmake is not installed in tbpw's environment (it is a dependency)")
    checkout = tmp_path / "llama.cpp"
    (checkout / "include").mkdir(parents=True)
    (checkout / "include" / "llama.h").write_text("/* enough for tbpw to accept the folder as a checkout */\n")
    (checkout / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\nproject(fake C CXX)\n")
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: internal compiler error' >&2\nexit 1\n")
    broken.chmod(0o755)
    result = run_cli("build", "--source", str(checkout), "--backend", "cpu", "--jobs", "1",
                     env={"TBPW_HOME": str(isolated_home), "CC": str(broken), "CXX": str(broken), "TBPW_BUILD": None})
    assert result.exit_code == 2
    line = error_line(result.output)
    m = re.fullmatch(r"error: llama\.cpp configure failed \(exit \d+\); full log: (\S+)", line)
    assert m, line
    log = Path(m.group(1))
    assert log.is_file() and log.is_relative_to(isolated_home)
    assert "broken-cc" in log.read_text()
    assert len(result.output.splitlines()) > 1  # the log's last lines follow the error line


@pytest.mark.tools
def test_failed_tool_run_is_one_line_with_the_log(tmp_path, active_build, wiki_text):
    log = tmp_path / "logs" / "ppl.log"
    with pytest.raises(TbpwError) as info:
        run_tool("llama-perplexity", ["-m", tmp_path / "missing.gguf", "-f", wiki_text], log_path=log)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("llama-perplexity failed: ")
    assert message.endswith(f"(log: {log})")
    assert "unable to load model" in message or "failed to load model" in message
    assert not re.search(r"\d+\.\d+\.\d+\.\d+ E ", message)  # llama.cpp's log time stamp is stripped
    assert info.value.details and "missing.gguf" in info.value.details
    text = log.read_text()
    assert str(active_build.tool("llama-perplexity")) in text.splitlines()[0]
    assert re.search(r"===== exit 1 after [\d.]+ s =====", text)


@pytest.mark.tools
def test_missing_input_file_is_named(tmp_path, active_build, tiny_model):
    with pytest.raises(TbpwError, match=r"failed to open file .*nothing\.txt"):
        run_tool("llama-perplexity", ["-m", tiny_model, "-f", tmp_path / "nothing.txt"], log_path=tmp_path / "x.log")


@pytest.mark.tools
def test_garbage_model_is_one_line_with_the_log(tmp_path, active_build, wiki_text):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    log = tmp_path / "garbage.log"
    with pytest.raises(TbpwError, match=rf"^llama-perplexity failed: .*\(log: {re.escape(str(log))}\)$") as info:
        run_tool("llama-perplexity", ["-m", garbage, "-f", wiki_text, "-c", "128"], log_path=log)
    assert "\n" not in str(info.value)
    assert log.is_file()


@pytest.mark.tools
def test_check_false_returns_the_failed_run(tmp_path, active_build):
    run = run_tool("llama-quantize", ["--help"], log_path=tmp_path / "help.log", check=False)
    assert run.returncode == 1  # llama-quantize's --help exits 1
    assert "--tensor-type-file" in run.output and run.log_path.is_file()


@pytest.mark.tools
def test_second_build_is_answered_from_the_cache(active_build):
    """Proved by what did not happen, not by a stopwatch: with no compiler to be found, a build that compiled
    anything would fail; and nothing of the cached build was written again."""
    env = {k: v for k, v in os.environ.items() if k != "TBPW_BUILD"}
    env.update(CC="/nonexistent/cc", CXX="/nonexistent/c++")
    watched = [active_build.root / "build.json", *sorted(active_build.bin_dir.iterdir())]
    stamps = {p: p.lstat().st_mtime_ns for p in watched}
    tbpw = Path(sys.executable).parent / "tbpw"
    proc = subprocess.run([str(tbpw), "build"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "compiler" not in proc.stderr and "warning" not in proc.stderr  # neither llama.cpp nor the collector
    assert {p: p.lstat().st_mtime_ns for p in watched} == stamps
    assert f"llama.cpp build {active_build.build_number}" in proc.stdout
    assert str(active_build.bin_dir) in proc.stdout


def test_a_damaged_build_record_is_one_line(tmp_path):
    (tmp_path / "build.json").write_text('{"key": "abc", "source_name": ')
    result = run_cli("doctor", env={"TBPW_BUILD": str(tmp_path)})
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert error_line(result.output) == (f"error: the build record {tmp_path / 'build.json'} is damaged "
                                         "(JSONDecodeError): run `tbpw build --force` to rebuild it")
