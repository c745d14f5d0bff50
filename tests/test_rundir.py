"""The run directory: finished stages are skipped, changed inputs rerun, killed stages leave nothing finished."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tbpw.errors import TbpwError
from tbpw.stages.rundir import RunDir


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
    first = RunDir(tmp_path / "run")
    first.run("s", {"src": src}, {}, _writer(calls, "x"))
    first.close()
    assert RunDir(tmp_path / "run").run("s", {"src": src}, {}, _writer(calls, "x")).skipped


# ----- the run directory belongs to tbpw, one run at a time -----


def test_a_folder_of_the_users_is_never_a_run_directory(tmp_path: Path):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "model.safetensors").write_bytes(b"weights")
    (mine / "measure").mkdir()
    (mine / "measure" / "errors.csv").write_text("mine\n")
    with pytest.raises(TbpwError, match=r"holds files tbpw did not make \(measure, model\): give a new or empty folder"):
        RunDir(mine)
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == [
        "measure", "measure/errors.csv", "model", "model/model.safetensors"]
    with pytest.raises(TbpwError, match="is a file, not a folder"):
        RunDir(mine / "measure" / "errors.csv")
    assert (mine / "model" / "model.safetensors").read_bytes() == b"weights"


def test_new_empty_and_own_folders_are_run_directories(tmp_path: Path):
    for root in (tmp_path / "new", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        run = RunDir(root)
        run.run("s", {}, {}, _writer([], "x"))
        run.close()
        assert RunDir(root).run("s", {}, {}, _writer([], "x")).skipped  # marked as tbpw's: reused
    legacy = tmp_path / "legacy"  # made before the marker: recognised by tbpw's fingerprint file
    legacy.mkdir()
    (legacy / ".fingerprints.json").write_text("{}")
    RunDir(legacy).close()


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path: Path):
    first = RunDir(tmp_path / "run")
    with pytest.raises(TbpwError) as err:
        RunDir(tmp_path / "run")
    message = str(err.value)
    assert f"output_dir {tmp_path / 'run'} is in use by pid {os.getpid()} on" in message
    assert message.endswith("wait for that run to finish, or give this one another output_dir") and "\n" not in message
    first.close()
    RunDir(tmp_path / "run").close()  # free again


def test_a_stage_name_never_leaves_the_run_directory(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    for name in ("../escape", "data-../../x", ".hidden", "a/b"):
        with pytest.raises(TbpwError, match="is not a plain name"):
            run.run(name, {}, {}, _writer([], "x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----- reuse only what is provably the same -----


def test_an_input_replaced_by_one_of_the_same_size_and_mtime_reruns(tmp_path: Path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"A" * 4096)
    stat = model.stat()
    run = RunDir(tmp_path / "run")
    calls: list = []
    run.run("s", {"model": model}, {}, _writer(calls, "x"))
    replacement = tmp_path / "other.gguf"
    replacement.write_bytes(b"B" * 4096)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, model)  # same name, size and mtime; other content
    assert model.stat().st_size == stat.st_size and model.stat().st_mtime_ns == stat.st_mtime_ns
    assert not run.run("s", {"model": model}, {}, _writer(calls, "y")).skipped
    with open(model, "r+b") as fh:  # edited in place, mtime put back
        fh.write(b"C")
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not run.run("s", {"model": model}, {}, _writer(calls, "z")).skipped
    assert calls == ["x", "y", "z"]


def test_a_deleted_or_damaged_stage_output_reruns_the_stage(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    calls: list = []
    first = run.run("s", {}, {}, _writer(calls, "xyz"))
    first.path("out.txt").unlink()  # deleted
    assert not run.run("s", {}, {}, _writer(calls, "xyz")).skipped
    first.path("out.txt").write_text("xy")  # truncated
    assert not run.run("s", {}, {}, _writer(calls, "xyz")).skipped
    first.path("out.txt").write_text("abc")  # same size, other content
    again = run.run("s", {}, {}, _writer(calls, "xyz"))
    assert not again.skipped and again.path("out.txt").read_text() == "xyz"
    (first.folder / "manifest.json").write_text("{ not json")  # a damaged manifest is no finished stage
    assert not run.run("s", {}, {}, _writer(calls, "xyz")).skipped
    (first.folder / "manifest.json").write_text('{"key": 1}')
    assert not run.run("s", {}, {}, _writer(calls, "xyz")).skipped
    assert len(calls) == 6
    assert run.run("s", {}, {}, _writer(calls, "xyz")).skipped


def test_an_interrupted_stage_leaves_nothing_and_a_killed_ones_leftovers_go_next_time(tmp_path: Path):
    run = RunDir(tmp_path / "run")

    def interrupted(folder: Path) -> dict:
        (folder / "big.gguf").write_bytes(b"x" * 100)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.run("s", {}, {}, interrupted)
    assert not list(run.root.glob(".*.partial"))
    run.close()
    (tmp_path / "run" / ".t.partial").mkdir()  # what a SIGKILL leaves behind
    (tmp_path / "run" / ".t.partial" / "half.gguf").write_bytes(b"half")
    RunDir(tmp_path / "run").close()
    assert not list((tmp_path / "run").glob(".*.partial"))


def test_a_released_output_keeps_its_stage_and_the_stages_keyed_by_it_finished(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    calls: list = []
    made = run.run("quant", {}, {}, _writer(calls, "weights"))
    made_file = made.path("out.txt")
    run.run("eval", {"model": made_file}, {"n": 1}, _writer(calls, "score"))
    assert run.release(made_file) and not made_file.exists()
    assert not run.release(made_file)  # released once
    again = RunDir(tmp_path / "run", claim=False)  # a later run: the manifests alone say what was released
    assert again.run("quant", {}, {}, _writer(calls, "weights")).skipped
    assert again.run("eval", {"model": made_file}, {"n": 1}, _writer(calls, "score")).skipped
    assert calls == ["weights", "score"]
    with pytest.raises(TbpwError, match=r"needs .*out\.txt.*--force quant"):  # a stage that must read it again
        again.run("eval", {"model": made_file}, {"n": 2}, _writer(calls, "other score"))
    assert not again.run("quant", {}, {}, _writer(calls, "weights"), force=True).skipped  # made again: usable
    assert made_file.read_text() == "weights"
    assert not again.run("eval", {"model": made_file}, {"n": 2}, _writer(calls, "other score")).skipped
    with pytest.raises(TbpwError, match="only those can be released"):
        again.release(tmp_path / "elsewhere.txt")
