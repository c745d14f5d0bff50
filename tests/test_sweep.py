"""`tbpw sweep`: two tiny models (the fork's tiny llama, and the tiny Gemma 4 MoE converted from its Hugging
Face folder) x two targets as one graph on two local workers; each model's report and the combined table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.errors import TbpwError
from tbpw.run import sweep as sweeps

SWEEP = Path(__file__).parent / "recipes" / "tiny-sweep.yaml"


def _sets(tiny_model: Path, wiki_text: Path) -> list[str]:
    sets = [f"datasets.calibration.options.path={wiki_text}", f"datasets.evaluation.options.path={wiki_text}"]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.tools
@pytest.mark.slow
def test_two_models_by_two_targets_as_one_graph(tmp_path, tiny_model, wiki_text):
    from tbpw.llamacpp.convert import missing_modules

    if missing := missing_modules():
        pytest.skip(f"the convert extra is not installed ({', '.join(missing)})")
    out = tmp_path / "sweep"
    # the sweep file names the tiny llama relative to the repository; the fixture may live elsewhere
    sweep_file = tmp_path / "sweep.yaml"
    text = SWEEP.read_text().replace("../../../shared/fixtures/fork-tiny/tiny-f16.gguf", str(tiny_model))
    sweep_file.write_text(text.replace("recipe: tiny.yaml", f"recipe: {SWEEP.parent / 'tiny.yaml'}").replace(
        "../fixtures/tiny-moe-hf", str(SWEEP.parent.parent / "fixtures" / "tiny-moe-hf")))
    result = CliRunner().invoke(main, ["sweep", str(sweep_file), *_sets(tiny_model, wiki_text), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "sweep tiny-sweep: 2 runs (llama/tiny, moe/tiny)" in result.output
    assert "executor: local, 2 workers" in result.output and "llama/tiny/measure" in result.output
    assert "moe/tiny: done  model" in result.output  # each run's stages log under its label
    assert (out / ".tbpw-sweep.json").is_file()  # the folder is the sweep's: a rerun may write into it again
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["model"], r["target"]) for r in rows] == [("llama", "like-Q4_K_M"), ("llama", "3.5bpw"),
                                                          ("moe", "like-Q4_K_M"), ("moe", "3.5bpw")]
    for row in rows:
        report = json.loads((out / row["model"] / "tiny" / "report" / "report.json").read_text())
        entries = {e["name"]: e for e in report["entries"]}
        best = entries[row["best"]]
        assert best.get("selected") and best["target"] == row["target"]
        assert row["metric"] == "kld_mean" and row["value"] == best["metrics"]["kld_mean"]
        if row["target"] == "like-Q4_K_M":  # stock at exactly that size
            assert row["stock"] == "stock-Q4_K_M"
            assert row["stock_value"] == entries["stock-Q4_K_M"]["metrics"]["kld_mean"]
            assert row["ratio"] == pytest.approx(row["value"] / row["stock_value"])
        else:  # no stock type of this run is 3.5 bpw
            assert row["stock"] is None and row["ratio"] is None
    table = (out / "sweep.md").read_text()
    assert result.output.rstrip().endswith(table.split("\n\n", 1)[1].rstrip())
    assert "| Model | Recipe | Target | Best quant | BPW | μKLD | Stock at that size |" in table
    assert "| moe | tiny | like-Q4_K_M | quant-like-Q4_K_M-knapsack |" in table
    again = CliRunner().invoke(main, ["sweep", str(sweep_file), *_sets(tiny_model, wiki_text), "-o", str(out)])
    assert again.exit_code == 0 and "done  " not in again.output  # every stage of both runs skipped


def test_sweep_file_mistakes_are_one_line(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: s\nrecipe: r.yaml\nrecipes: {a: r.yaml}\nmodels: {m: {gguf: x.gguf}}\n")
    with pytest.raises(TbpwError, match=r"s.yaml: give exactly one of recipe \(one file\) and recipes"):
        sweeps.load(bad)
    bad.write_text("name: s\nrecipe: r.yaml\nmodels: {m: {gguf: x.gguf}}\nmodel: {}\n")
    with pytest.raises(TbpwError, match=r"s.yaml: unknown field 'model'"):
        sweeps.load(bad)
    bad.write_text("name: s\nrecipe: r.yaml\nmodels: {'a b': {gguf: x.gguf}}\n")
    with pytest.raises(TbpwError, match=r"label 'a b': use letters"):
        sweeps.load(bad)
    with pytest.raises(TbpwError, match=r"sweep file .*nope.yaml does not exist"):
        sweeps.load(tmp_path / "nope.yaml")


def test_combined_rows_pick_the_stock_at_the_same_size():
    report = {"select_by": ["kld_mean"], "columns": [{"key": "kld_mean", "label": "μKLD"}], "entries": [
        {"name": "baseline", "kind": "base", "bpw": 16.0, "metrics": {}},
        {"name": "stock-Q4_K_M", "kind": "stock", "bpw": 4.89, "metrics": {"kld_mean": 0.02}},
        {"name": "stock-Q3_K_M", "kind": "stock", "bpw": 3.91, "metrics": {"kld_mean": 0.08}},
        {"name": "quant-like-Q4_K_M-a", "kind": "tbpw", "target": "like-Q4_K_M", "bpw": 4.885,
         "metrics": {"kld_mean": 0.01}, "selected": True},
        {"name": "quant-like-Q4_K_M-b", "kind": "tbpw", "target": "like-Q4_K_M", "bpw": 4.885,
         "metrics": {"kld_mean": 0.03}},
        {"name": "quant-3bpw-a", "kind": "tbpw", "target": "3bpw", "bpw": 3.0, "metrics": {"kld_mean": 0.2},
         "selected": True}]}
    rows = sweeps.combined_rows("m", "r", report, Path("report.md"))
    assert [(r["best"], r["stock"], r["ratio"]) for r in rows] == [("quant-like-Q4_K_M-a", "stock-Q4_K_M", 0.5),
                                                                   ("quant-3bpw-a", None, None)]
    table = sweeps.combined_table(rows)
    assert "| m | r | like-Q4_K_M | quant-like-Q4_K_M-a | 4.8850 | 0.010000 | stock-Q4_K_M | 4.8900 | 0.020000 | 0.500 |" in table
    assert "| m | r | 3bpw | quant-3bpw-a | 3.0000 | 0.200000 | – | – | – | – |" in table


def _sweep_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_a_folder_of_the_users_is_refused_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sweep.md").write_text("my notes\n")
    (mine / "sweep.json").write_text('{"mine": true}\n')
    sweep_file = _sweep_file(tmp_path, "name: s\nrecipe: r.yaml\nmodels: {m: {gguf: x.gguf}}\n")
    result = CliRunner().invoke(main, ["sweep", str(sweep_file), "-o", str(mine)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == (f"error: output_dir {mine} holds files tbpw did not make (sweep.json, sweep.md): give a "
                             "new or empty folder (tbpw writes a run only into a folder it made, so that it never "
                             "replaces your files)\n")
    assert sorted(p.name for p in mine.iterdir()) == ["sweep.json", "sweep.md"]
    assert (mine / "sweep.md").read_text() == "my notes\n" and (mine / "sweep.json").read_text() == '{"mine": true}\n'


def test_the_sweep_writes_only_into_its_own_folder(tmp_path):
    out = tmp_path / "out"
    runs = [Path("m", "r")]
    assert sweeps.output_problem(out, runs) is None  # absent
    out.mkdir()
    assert sweeps.output_problem(out, runs) is None  # empty
    (out / ".tbpw-run.json").write_text("{}")
    assert "is the run directory of a `tbpw run`, not a sweep's" in (sweeps.output_problem(out, runs) or "")
    (out / ".tbpw-run.json").unlink()
    sweeps._mark(out, "s")
    assert sweeps.output_problem(out, runs) is None  # marked: a sweep made it
    (out / "m" / "r").mkdir(parents=True)
    (out / "m" / "r" / "notes.txt").write_text("mine")
    assert sweeps.output_problem(out, runs) == (
        f"run m/r: output_dir {out / 'm' / 'r'} holds files tbpw did not make (notes.txt): give a new or empty folder "
        "(tbpw writes a run only into a folder it made, so that it never replaces your files)")
    (out / "m" / "r" / "notes.txt").unlink()
    (out / "m" / "r" / ".tbpw-run.json").write_text("{}")
    assert sweeps.output_problem(out, runs) is None  # the run's own folder from the last sweep


def test_a_sweep_folder_from_before_the_marker_is_recognised(tmp_path):
    out = tmp_path / "old"
    (out / "m" / "r").mkdir(parents=True)
    (out / "m" / "r" / ".tbpw-run.json").write_text("{}")
    (out / "sweep.json").write_text('{"name": "s", "rows": []}')
    (out / "sweep.md").write_text("# Sweep s\n")
    assert sweeps.output_problem(out, [Path("m", "r")]) is None
    (out / "notes.txt").write_text("mine")  # anything else: not (only) a sweep's
    assert "holds files tbpw did not make (m, notes.txt, sweep.json, ...)" in (sweeps.output_problem(out, []) or "")


LABEL_MISTAKES = [
    ("model label that climbs out", "models: {'..': {gguf: x.gguf}}\n", "label '..': use letters, digits, '.', '_' "
     "and '-', not starting with a dot (it names a folder of the sweep)"),
    ("hidden model label", "models: {.m: {gguf: x.gguf}}\n", "label '.m': use letters"),
    ("recipe label with a path", "recipes: {'a/b': r.yaml}\nmodels: {m: {gguf: x.gguf}}\n", "label 'a/b': use letters"),
    ("variant label that climbs out", "models: {m: {gguf: x.gguf}}\nvariants: {'..': []}\n", "label '..': use letters"),
    ("labels one case apart", "models: {Llama: {gguf: x.gguf}, llama: {gguf: y.gguf}}\n",
     "labels 'Llama' and 'llama' name the same folder where case is ignored: rename one"),
    ("recipe and variant labels that make one folder",
     "recipes: {a: r.yaml, a-b: r.yaml}\nvariants: {b-c: [], c: []}\nmodels: {m: {gguf: x.gguf}}\n",
     "recipe 'a' with variant 'b-c' and recipe 'a-b' with variant 'c' would both run in folder 'a-b-c': rename one"),
    ("model label that is the table's name", "models: {sweep.md: {gguf: x.gguf}}\n",
     "model label 'sweep.md' is the name of the sweep's table: rename the model"),
    ("recipe file whose name is no label", "recipe: my recipe.yaml\nmodels: {m: {gguf: x.gguf}}\n",
     "the recipe file's name 'my recipe.yaml': use letters"),
    ("sweep name that climbs out", "name: '..'\nmodels: {m: {gguf: x.gguf}}\n", "field 'name': String should match"),
]


@pytest.mark.parametrize("what,text,message", LABEL_MISTAKES, ids=[m[0] for m in LABEL_MISTAKES])
def test_labels_are_plain_names_of_one_folder_each(tmp_path, what, text, message):
    header = "" if text.startswith("name:") else "name: s\n"
    header += "" if "recipe" in text else "recipe: r.yaml\n"
    sweep_file = _sweep_file(tmp_path, header + text)
    result = CliRunner().invoke(main, ["sweep", str(sweep_file), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith(f"error: {sweep_file}: ") and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_an_unknown_field_gets_its_closest_match(tmp_path):
    sweep_file = _sweep_file(tmp_path, "name: s\nrecipe: r.yaml\nmodles: {m: {gguf: x.gguf}}\n")
    result = CliRunner().invoke(main, ["sweep", str(sweep_file)])
    # the misspelt field is told once, as unknown, not again as the missing `models`
    assert result.exit_code == 2 and result.stderr == (f"error: {sweep_file}: unknown field 'modles' (did you mean "
                                                       "'models'?)\n")
    sweep_file.write_text("name: s\nrecipe: r.yaml\nmodels: {m: {gguf: x.gguf}}\nexecutor: {nmae: ray}\n")
    with pytest.raises(TbpwError, match=r"unknown field 'executor.nmae' \(did you mean 'name'\?\)"):
        sweeps.load(sweep_file)
