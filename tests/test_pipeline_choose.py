"""`tbpw run` with `calibrate:` and `choose:`: calibrated tables, the choice among plans by calibration KLD,
and the proof that neither ever runs a tool on the evaluation text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.llamacpp import tools
from tbpw.measure.table import ErrorTable
from tbpw.model.inventory import ModelInventory

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"
pytestmark = [pytest.mark.tools, pytest.mark.slow]


@pytest.fixture(scope="module")
def choose_run(tmp_path_factory, tiny_model, wiki_text):
    """The tiny recipe with one bpw target, two allocators, calibration per role and the choice; every
    llama.cpp command line it ran, recorded while the tools run for real."""
    out = tmp_path_factory.mktemp("choose") / "tiny"
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}",
            "targets=[{bpw: 3.5}]", "compare_stock=[]", "allocators=[{name: knapsack}, {name: lagrangian}]",
            "bench.enabled=false", "calibrate={grouping: role, ctx: 256, chunks: 2, strengths: [1.0, 0.5]}",
            "choose={ctx: 256, chunks: 2, refine_rounds: 1, refine_tries: 2}"]
    commands: list[list[str]] = []
    real_launch = tools.launch

    def spy(argv, env, cwd=None):  # every llama.cpp tool starts here
        if Path(str(argv[0])).name.startswith("llama-"):
            # a text is given by its name to a tool run in its folder (so that no output records the folder)
            commands.append([str(Path(cwd or ".") / a) if i and argv[i - 1] == "-f" else str(a)
                             for i, a in enumerate(argv)])
        return real_launch(argv, env, cwd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TBPW_SENSITIVITY_CACHE", str(out.parent / "sensitivity"))
        mp.setattr(tools, "launch", spy)
        result = CliRunner().invoke(main, ["run", str(RECIPE), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    return out, commands


def _text_of(argv: list[str]) -> str | None:
    return argv[argv.index("-f") + 1] if "-f" in argv else None


def test_choose_writes_the_targets_quant_and_reports_it(choose_run):
    out, _ = choose_run
    report = json.loads((out / "report" / "report.json").read_text())
    by = {e["name"]: e for e in report["entries"]}
    # the allocators' plans are the choice's candidates, not quants of their own (choose.measured_quants)
    assert list(by) == ["baseline", "quant-3.5bpw-choose"]
    assert not (out / "quant-3.5bpw-knapsack").exists()
    chosen = by["quant-3.5bpw-choose"]
    assert chosen["allocator"] == "choose" and chosen["note"].startswith("chose ")
    assert 3.495 <= chosen["bpw"] <= 3.5
    assert chosen["types"] == ModelInventory.load(out / "quant-3.5bpw-choose" / "model.gguf").types()
    assert f"- quant-3.5bpw-choose: {chosen['note']}" in (out / "report" / "report.md").read_text()


def test_calibrate_stage_writes_a_scaled_table_per_strength(choose_run):
    out, _ = choose_run
    result = json.loads((out / "calibrate" / "manifest.json").read_text())["result"]
    assert set(result["tables"]) == {"wmse+kld", "wmse+kld0.5"}
    measured = ErrorTable.read_json(out / "measure" / "errors.json").by_name()
    sens = json.loads((out / "calibrate" / "sensitivity.json").read_text())
    assert sens["grouping"] == "role" and sens["probe_types"] == ["Q3_K"]
    full = ErrorTable.read_json(out / "calibrate" / result["tables"]["wmse+kld"])
    half = ErrorTable.read_json(out / "calibrate" / result["tables"]["wmse+kld0.5"])
    for t_full, t_half in zip(full.tensors, half.tensors):
        for c_full, c_half, c_meas in zip(t_full.candidates, t_half.candidates, measured[t_full.name].candidates):
            assert c_full.type == c_half.type == c_meas.type
            if c_meas.error > 0:  # the half-strength scale is the square root of the full one
                assert c_half.error / c_meas.error == pytest.approx((c_full.error / c_meas.error) ** 0.5, rel=1e-9)


def test_choice_is_the_lowest_calibration_kld_among_the_calibrated_plans(choose_run):
    out, _ = choose_run
    result = json.loads((out / "quant-3.5bpw-choose" / "manifest.json").read_text())["result"]
    considered = set(result["calibration_kld"]) | set(result["duplicates"])
    # choose.tables defaults to the calibrated tables: the measured table's plans are not candidates
    assert considered == {f"{a}-{t}" for a in ("knapsack", "lagrangian") for t in ("wmse-kld", "wmse-kld0.5")}
    scores = result["calibration_kld"]
    assert result["chosen"] == min(scores, key=scores.get)
    # a refinement swap is only kept when it lowers the calibration KLD further
    assert result["calibration_kld_chosen"] <= scores[result["chosen"]]
    assert bool(result["refined"]) == (result["calibration_kld_chosen"] < scores[result["chosen"]])
    assert not list((out / "quant-3.5bpw-choose" / "work").glob("*.gguf"))
    assert not list((out / "quant-3.5bpw-choose" / "work").glob("*.logits"))


def test_no_selection_step_reads_the_evaluation_text(choose_run):
    out, commands = choose_run
    calibration = next((out / "data-calibration").glob("*.txt"))
    evaluation = next((out / "data-evaluation").glob("*.txt"))
    texts = [Path(t).resolve() for argv in commands if (t := _text_of(argv))]
    # the float baseline is the one command that reads the evaluation text; calibration, the choice among
    # plans and the refinement all score on the calibration text
    assert texts.count(evaluation.resolve()) == 1
    baseline = next(argv for argv in commands if _text_of(argv) and Path(_text_of(argv)).resolve() == evaluation.resolve())
    assert ".baseline.partial" in baseline[baseline.index("--kl-divergence-base") + 1]
    assert set(texts) == {calibration.resolve(), evaluation.resolve()}
    # the imatrix, and ONE set of float logits that calibrate and the choice share
    assert texts.count(calibration.resolve()) == 2
    # every quant and probe of the run was assembled from the tensor store: llama-quantize ran for none of them
    assert not [argv for argv in commands if Path(argv[0]).name == "llama-quantize"]
