"""Atomic files and folders: a failed or killed write never leaves something that looks complete."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tbpw.errors import TbpwError
from tbpw.files.atomic import publish_folder, temporary_prefix, write_json


def test_a_failed_write_leaves_the_old_file(tmp_path: Path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        write_json(target, {"v": Unserializable()})
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_publish_folder_replaces_the_old_folder_only_when_the_build_succeeds(tmp_path: Path):
    folder = tmp_path / "asset"

    def build(version: int):
        def make(staging: Path) -> int:
            (staging / "data.txt").write_text(f"v{version}")
            return version

        return make

    assert publish_folder(folder, build(1)) == 1 and (folder / "data.txt").read_text() == "v1"

    def broken(staging: Path) -> int:
        (staging / "data.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        publish_folder(folder, broken)
    assert (folder / "data.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]  # no staging folder left behind

    assert publish_folder(folder, build(2)) == 2 and (folder / "data.txt").read_text() == "v2"
    assert publish_folder(folder, build(3), keep_existing=lambda: True) == 3
    assert (folder / "data.txt").read_text() == "v2"  # another process published first: its folder stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_a_killed_writer_go_with_the_next_write(tmp_path: Path):
    target = tmp_path / "model.gguf"
    prefix = temporary_prefix(target).rsplit("-", 1)[0]  # ".model.gguf.<host>"
    dead = tmp_path / f"{prefix}-{_dead_pid()}.k1ll3d.tmp"
    dead.write_bytes(b"half a model")
    folder = tmp_path / f"{prefix}-{_dead_pid()}.d1r.tmp"
    folder.mkdir()
    alive = tmp_path / f"{prefix}-{os.getppid()}.w0rk.tmp"  # a writer still running keeps its file
    alive.write_bytes(b"in progress")
    mine = tmp_path / "model.gguf.notes.txt"  # not a temporary file at all
    mine.write_text("mine")
    write_json(target, {"v": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.gguf", alive.name, mine.name])


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path: Path, monkeypatch):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(TbpwError) as err:
        write_json(target, {"v": 2})
    assert str(err.value) == (f"cannot write {target} (No space left on device): free space on that disk, or choose "
                              "another location")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_folder_where_the_file_belongs_is_one_line(tmp_path: Path):
    (tmp_path / "out.json").mkdir()
    with pytest.raises(TbpwError, match=r"cannot write .*out\.json \(Is a directory\): a folder is there where a file is expected"):
        write_json(tmp_path / "out.json", {"v": 1})
