"""`evaluation.scope: selected` and `keep: chosen` on the tiny model: the task benchmarks and llama-bench run on
each target's selected quant and the stock types only, the plans not kept are deleted once evaluated (their
numbers stay in the report), a rerun does no work at all, and `--plan` counts what will run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from task_files import hellaswag_from

from tbpw.cli import main

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"
pytestmark = [pytest.mark.tools, pytest.mark.slow]


def _args(tiny_model: Path, wiki_text: Path, hellaswag: Path, out: Path) -> list[str]:
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}", "targets=[{bpw: 4.5}]",
            "allocators=[{name: knapsack}, {name: lagrangian}]", "compare_stock=[Q4_K_M]",
            "measure.candidates=[Q3_K, Q4_K, Q5_K, Q6_K, Q8_0]", "measure.sampling={scale: 0.25}",
            f"datasets.hellaswag={{name: file, options: {{path: {hellaswag}, kind: hellaswag}}}}",
            "evaluators=[{name: kld}, {name: hellaswag, options: {tasks: 6}}]",
            "bench={pp: 16, tg: 4, pg: null, repetitions: 1}", "evaluation.scope=selected", "keep=chosen"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory, tiny_model, wiki_text):
    work = tmp_path_factory.mktemp("keep")
    args = _args(tiny_model, wiki_text, hellaswag_from(wiki_text, work / "hellaswag.txt", n=6), work / "run")
    plan = CliRunner().invoke(main, ["run", str(RECIPE), *args, "--plan"])
    assert plan.exit_code == 0, plan.output
    result = CliRunner().invoke(main, ["run", str(RECIPE), *args])
    assert result.exit_code == 0, result.output
    return work / "run", args, plan.output, result.output


def test_tasks_and_speed_are_measured_on_the_selected_and_stock_quants_only(kept_run):
    out, _, _, _ = kept_run
    report = json.loads((out / "report" / "report.json").read_text())
    by = {e["name"]: e for e in report["entries"]}
    plans = ["quant-4.5bpw-knapsack", "quant-4.5bpw-lagrangian"]
    [chosen] = [n for n in plans if by[n].get("selected")]
    [other] = [n for n in plans if n != chosen]
    for name in (chosen, "stock-Q4_K_M"):
        assert {"kld_mean", "hellaswag"} <= set(by[name]["metrics"]) and by[name]["bench"]
        assert (out / f"eval-{name}+tasks" / "manifest.json").is_file()
    assert "kld_mean" in by[other]["metrics"] and "hellaswag" not in by[other]["metrics"] and not by[other]["bench"]
    assert not (out / f"eval-{other}+tasks").exists() and not (out / f"bench-{other}").exists()
    # the selection is the report's: the lower KLD on the evaluation text
    assert by[chosen]["metrics"]["kld_mean"] <= by[other]["metrics"]["kld_mean"]


def test_the_plan_not_kept_is_deleted_and_its_numbers_stay(kept_run):
    out, _, _, _ = kept_run
    report = json.loads((out / "report" / "report.json").read_text())
    by = {e["name"]: e for e in report["entries"]}
    [other] = [n for n in ("quant-4.5bpw-knapsack", "quant-4.5bpw-lagrangian") if not by[n].get("selected")]
    assert by[other]["released"] and "keep: chosen" in by[other]["note"]
    assert not (out / other / "model.gguf").exists()
    manifest = json.loads((out / other / "manifest.json").read_text())
    assert manifest["released"] == ["model.gguf"] and manifest["outputs"]["model.gguf"]["bytes"] == by[other]["size_bytes"]
    kept = [e for e in report["entries"] if e["kind"] != "base" and not e.get("released")]
    assert all((out / e["path"]).is_file() for e in kept) and len(kept) == 2  # paths in the run directory


def test_a_rerun_does_no_work(kept_run):
    out, args, _, first = kept_run
    again = CliRunner().invoke(main, ["run", str(RECIPE), *args])
    assert again.exit_code == 0, again.output
    lines = [line for line in again.output.splitlines() if line.startswith(("skip ", "done ", "deleted "))]
    assert lines and all(line.startswith("skip ") for line in lines)
    assert "deleted quant-4.5bpw-" in first


def test_the_plan_counts_tasks_and_bench_of_the_selected_quant_once(kept_run):
    _, _, plan, _ = kept_run
    stages = re.findall(r"^(?:run|reuse\?|as is) +(\S+)$", plan, re.M)
    assert "eval-quant-4.5bpw-knapsack+tasks" in stages and not any(s.startswith("release-") for s in stages)
    # kld on 3 quants; hellaswag on the stock quant and the selected one; llama-bench on those two
    assert re.search(r"5 evaluation runs, 2 llama-bench runs", plan), plan


def test_the_plans_disk_is_at_least_what_the_run_wrote(kept_run):
    """The disk `--plan` (and the preflight) counts is an upper bound of the run folder, its logs and report
    included (each file counted once: the report's quants are hard links)."""
    out, _, plan, _ = kept_run
    needed = int(re.search(r"^plan: disk: at least [\d.]+ \w+ \((\d+) bytes\)", plan, re.M).group(1))
    files = {(p.stat().st_dev, p.stat().st_ino): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert sum(files.values()) <= needed
