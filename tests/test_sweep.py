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
