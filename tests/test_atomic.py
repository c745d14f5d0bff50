"""Atomic files and folders: a failed or killed write never leaves something that looks complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from tbpw.files.atomic import publish_folder, write_json


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
