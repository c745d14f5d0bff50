"""Never destroy what tbpw did not make: no command writes over one of its own inputs, and `tbpw run` writes
only into a folder it owns. Every case starts from the mistake (an output path equal to an input, a user's
folder as the run's output) and checks that the user's files are byte for byte what they were."""

from __future__ import annotations

import hashlib
import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mine(tmp_path: Path, tiny_model: Path, stock_imatrix: Path, wiki_text: Path, fork_error_table) -> dict[str, Path]:
    """Copies of the user's files (so that a failure here can never damage the fixtures)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    files = {"model": folder / "model.gguf", "imatrix": folder / "model.imatrix.gguf", "text": folder / "text.txt",
             "table": folder / "table.json", "plan": folder / "q.plan.json"}
    shutil.copyfile(tiny_model, files["model"])
    shutil.copyfile(stock_imatrix, files["imatrix"])
    shutil.copyfile(wiki_text, files["text"])
    fork_error_table.write_json(files["table"])
    fork_error_table.write_json(files["plan"])  # a table kept under the name of the plan of `-o q.gguf`
    return files


def _untouched(files: dict[str, Path]):
    before = {name: _sha(path) for name, path in files.items()}
    listing = sorted(p.name for p in next(iter(files.values())).parent.iterdir())

    def check() -> None:
        assert {name: _sha(path) for name, path in files.items()} == before
        assert sorted(p.name for p in next(iter(files.values())).parent.iterdir()) == listing

    return check


CASES = [
    ("quantize over its model", ["quantize", "{model}", "--imatrix", "{imatrix}", "--target-bpw", "4", "--error-table",
                                 "{table}", "-o", "{model}"], "is the model this command reads"),
    ("quantize over its imatrix", ["quantize", "{model}", "--imatrix", "{imatrix}", "--target-bpw", "4",
                                   "--error-table", "{table}", "-o", "{imatrix}"], "is the imatrix this command reads"),
    ("quantize's plan beside the output over its error table",
     ["quantize", "{model}", "--imatrix", "{imatrix}", "--target-bpw", "4", "--error-table", "{folder}/q.plan.json",
      "--dry-run", "-o", "{folder}/q.gguf"], "plan file {folder}/q.plan.json is the error table"),
    ("imatrix over its model", ["imatrix", "make", "{model}", "-f", "{text}", "-o", "{model}"],
     "is the model this command reads"),
    ("imatrix over its text", ["imatrix", "{model}", "-f", "{text}", "-o", "{text}"],
     "is the calibration text this command reads"),
    ("imatrix log over its model", ["imatrix", "make", "{model}", "-f", "{text}", "-o", "{folder}/new.gguf",
                                    "--log", "{model}"], "log {folder}/model.gguf is the model"),
    ("measure over its model", ["measure", "{model}", "--imatrix", "{imatrix}", "--out", "{model}"],
     "--out {folder}/model.gguf is the model"),
    ("measure's CSV over its imatrix", ["measure", "{model}", "--imatrix", "{imatrix}", "--csv", "{imatrix}"],
     "--csv {folder}/model.imatrix.gguf is the imatrix"),
    ("calibrate over its table", ["calibrate", "{model}", "--imatrix", "{imatrix}", "--error-table", "{table}",
                                  "-f", "{text}", "-o", "{table}"], "is the error table this command reads"),
    ("choose over its model", ["choose", "{model}", "--imatrix", "{imatrix}", "--target-bpw", "4", "--error-table",
                               "{table}", "-f", "{text}", "-o", "{model}"], "is the model this command reads"),
    ("an output that is a folder", ["measure", "{model}", "--imatrix", "{imatrix}", "--out", "{folder}"],
     "--out {folder} is a folder: give a file path"),
]


@pytest.mark.parametrize("what,args,words", CASES, ids=[c[0] for c in CASES])
def test_no_command_writes_over_its_own_input(mine, what, args, words):
    check = _untouched(mine)
    fill = {**{k: str(v) for k, v in mine.items()}, "folder": str(mine["model"].parent)}
    result = CliRunner().invoke(main, [a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert words.format(**fill) in result.stderr
    check()


def test_a_symlink_to_the_input_is_the_input(mine):
    check = _untouched(mine)
    link = mine["model"].parent.parent / "link.gguf"
    link.symlink_to(mine["model"])
    result = CliRunner().invoke(main, ["measure", str(mine["model"]), "--out", str(link)])
    assert result.exit_code == 2 and "is the model this command reads" in result.stderr
    check()


@pytest.mark.tools
def test_a_run_never_writes_into_a_folder_of_the_users(mine, tmp_path, tiny_model, wiki_text):
    """`output_dir: .` beside the user's model folder `model/`: the model stage would have replaced it."""
    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    (project / "model" / "model.safetensors").write_bytes(b"the user's weights")
    (project / "measure").mkdir()
    (project / "measure" / "errors.csv").write_text("the user's measurements\n")
    recipe = project / "q.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        name: q
        model: {{gguf: {tiny_model}}}
        datasets:
          calibration: {{name: file, options: {{path: {wiki_text}}}}}
          evaluation: {{name: file, options: {{path: {wiki_text}}}}}
        targets: [{{bpw: 4}}]
        output_dir: .
        """))
    files = {"weights": project / "model" / "model.safetensors", "csv": project / "measure" / "errors.csv",
             "recipe": recipe}
    before = {k: _sha(p) for k, p in files.items()}
    for args in (["run", str(recipe)], ["run", str(recipe), "--set", f"output_dir={project / 'measure'}"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "holds files tbpw did not make" in result.stderr and result.stderr.count("\n") == 1
    assert {k: _sha(p) for k, p in files.items()} == before
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == [
        "measure", "measure/errors.csv", "model", "model/model.safetensors", "q.yaml"]


@pytest.mark.tools
def test_an_interrupted_quantize_leaves_no_temporary_file(mine, tmp_path):
    """SIGTERM while llama-quantize writes the stand-in `.out.gguf.<host>-<pid>.*.tmp`: it goes, nothing is
    published, and the exit status is 143."""
    import os
    import signal
    import threading
    import time

    out = tmp_path / "out.gguf"
    check = _untouched(mine)
    stop = threading.Event()

    def terminate_when_writing() -> None:
        while not stop.is_set():
            if list(tmp_path.glob(".out.gguf.*.tmp")):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=terminate_when_writing)
    watcher.start()
    try:
        result = CliRunner().invoke(main, ["quantize", str(mine["model"]), "--imatrix", str(mine["imatrix"]),
                                           "--target-bpw", "4.5", "--error-table", str(mine["table"]), "-o", str(out)])
    finally:
        stop.set()
        watcher.join()
    assert result.exit_code == 143, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("interrupted: no output was left half-written")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    check()
