"""The run directory: finished stages are skipped, changed inputs rerun, killed stages leave nothing finished."""

from __future__ import annotations

from pathlib import Path

import pytest

from tbpw.run.rundir import RunDir


def _writer(calls: list, text: str):
    def body(folder: Path) -> dict:
        calls.append(text)
        (folder / "out.txt").write_text(text)
        return {"file": "out.txt", "length": len(text)}

    return body


def test_finished_stage_is_skipped_and_changed_input_reruns(tmp_path: Path):
    src = tmp_path / "in.txt"
    src.write_text("a")
    run = RunDir(tmp_path / "run")
    calls: list = []
    first = run.run("stage", {"src": src}, {"k": 1}, _writer(calls, "x"))
    again = run.run("stage", {"src": src}, {"k": 1}, _writer(calls, "x"))
    assert (first.skipped, again.skipped) == (False, True)
    assert again.result == {"file": "out.txt", "length": 1}
    assert again.path("out.txt").read_text() == "x"
    src.write_text("b")  # content change: rerun
    assert not run.run("stage", {"src": src}, {"k": 1}, _writer(calls, "y")).skipped
    assert not run.run("stage", {"src": src}, {"k": 2}, _writer(calls, "z")).skipped  # option change: rerun
    assert run.run("stage", {"src": src}, {"k": 2}, _writer(calls, "z"), force=True).skipped is False
    assert calls == ["x", "y", "z", "z"]


def test_touching_an_input_without_changing_it_does_not_rerun(tmp_path: Path):
    src = tmp_path / "in.txt"
    src.write_text("same")
    run = RunDir(tmp_path / "run")
    calls: list = []
    run.run("s", {"src": src}, {}, _writer(calls, "x"))
    src.write_text("same")  # new mtime, same content
    assert run.run("s", {"src": src}, {}, _writer(calls, "x")).skipped
    assert calls == ["x"]


def test_a_killed_stage_is_not_finished_and_the_old_result_survives(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    run.run("s", {}, {"v": 1}, _writer([], "old"))

    def dies(folder: Path) -> dict:
        (folder / "out.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.run("s", {}, {"v": 2}, dies)
    assert (run.folder("s") / "out.txt").read_text() == "old"  # never half-written
    calls: list = []
    assert not run.run("s", {}, {"v": 2}, _writer(calls, "new")).skipped  # resumes: reruns the unfinished stage
    assert calls == ["new"] and not list(run.root.glob(".*.partial"))


def test_fingerprints_survive_a_new_rundir(tmp_path: Path):
    src = tmp_path / "in.txt"
    src.write_text("a")
    calls: list = []
    RunDir(tmp_path / "run").run("s", {"src": src}, {}, _writer(calls, "x"))
    assert RunDir(tmp_path / "run").run("s", {"src": src}, {}, _writer(calls, "x")).skipped
