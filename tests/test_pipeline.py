"""`tbpw run` end to end on the tiny model: every stage, the report's numbers, skipping and resuming."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.llamacpp import parsers

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"
pytestmark = [pytest.mark.tools, pytest.mark.slow]


def _sets(tiny_model: Path, wiki_text: Path, out: Path) -> list[str]:
    return [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}"]


def _args(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, wiki_text):
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = CliRunner().invoke(main, ["run", str(RECIPE), *_args(_sets(tiny_model, wiki_text, out))])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_every_stage_runs_and_the_report_lists_every_quant(finished_run):
    out, output = finished_run
    report = json.loads((out / "report" / "report.json").read_text())
    names = [e["name"] for e in report["entries"]]
    assert names == ["baseline", "stock-Q3_K_M", "stock-Q4_K_M", "quant-like-Q4_K_M-knapsack", "quant-3.5bpw-knapsack"]
    md = (out / "report" / "report.md").read_text()
    for name in names:
        assert f"| {name}" in md
    assert "★" in md and "## Speed (llama-bench)" in md and "### quant-" in md
    by = {e["name"]: e for e in report["entries"]}
    stock_bpw = by["stock-Q4_K_M"]["bpw"]
    assert stock_bpw - 0.005 <= by["quant-like-Q4_K_M-knapsack"]["bpw"] <= stock_bpw
    assert 3.495 <= by["quant-3.5bpw-knapsack"]["bpw"] <= 3.5


def test_report_numbers_are_the_parsed_tool_outputs(finished_run):
    out, _ = finished_run
    report = json.loads((out / "report" / "report.json").read_text())
    for entry in report["entries"][1:]:
        log = (out / f"eval-{entry['name']}" / "kld.log").read_text()
        kld = parsers.parse_kl_divergence(log)
        assert entry["metrics"]["kld_mean"] == kld.kld.mean.value
        assert entry["metrics"]["same_top_p"] == kld.same_top_p_pct.value
        assert entry["metrics"]["rho_ppl"] == kld.ln_ppl_correlation_pct
        bench = parsers.parse_bench_json((out / f"bench-{entry['name']}" / "bench.log").read_text())
        assert entry["bench"]["pp32"] == next(t.avg_ts for t in bench.tests if t.n_prompt == 32)
    baseline = parsers.parse_perplexity((out / "baseline" / "perplexity.log").read_text())
    assert report["entries"][0]["metrics"]["ppl"] == baseline.ppl.value


def test_rerun_skips_every_finished_stage(finished_run, tiny_model, wiki_text):
    out, first = finished_run
    again = CliRunner().invoke(main, ["run", str(RECIPE), *_args(_sets(tiny_model, wiki_text, out))])
    assert again.exit_code == 0, again.output
    stages = [line.split()[1] for line in again.output.splitlines() if line.startswith(("skip ", "done "))]
    assert stages and all(line.startswith("skip ") for line in again.output.splitlines() if line.startswith(("skip ", "done ")))
    assert "measure" in stages and "eval-quant-3.5bpw-knapsack" in stages
    changed = CliRunner().invoke(main, ["run", str(RECIPE), *_args(_sets(tiny_model, wiki_text, out)),
                                        "--set", "targets.1.bpw=3.25"])
    assert changed.exit_code == 0, changed.output
    assert "done  quant-3.25bpw-knapsack" in changed.output and "skip  measure" in changed.output


def test_killed_run_resumes_without_recomputing_finished_stages(tmp_path, tiny_model, wiki_text):
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "tbpw.cli", "run", str(RECIPE), *_args(_sets(tiny_model, wiki_text, out))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    # baseline and imatrix run side by side (2 workers): either may finish first
    while not all((out / stage / "manifest.json").exists() for stage in ("baseline", "imatrix")):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the run never finished its baseline and imatrix stages"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/manifest.json")}
    assert {"baseline", "imatrix"} <= set(finished)
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for stage in finished:
        assert f"skip  {stage}" in resumed.stderr
        assert (out / stage / "manifest.json").stat().st_mtime_ns == finished[stage]
    assert (out / "report" / "report.md").is_file() and not list(out.glob(".*.partial"))


def test_model_stage_converts_a_hugging_face_folder_once(tmp_path, wiki_text):
    from tbpw.model.inventory import ModelInventory
    from tbpw.run import recipe as recipes
    from tbpw.run.pipeline import Pipeline
    from tbpw.stages import model as model_stage

    hf = Path(__file__).parent / "fixtures" / "tiny-llama-hf"
    # three of its weights are below F16's smallest subnormal: F16 is refused unless clipping is allowed
    sets = [f"model={{path: {hf}, allow_f16_clipping: true}}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={tmp_path / 'run'}"]
    logs: list[str] = []
    recipe = recipes.load(RECIPE, sets)
    pipeline = Pipeline(recipe, log=logs.append)
    base, notes = model_stage.run(pipeline.context, recipe.model)
    inventory = ModelInventory.load(base)
    assert base.name == "base.gguf" and inventory.architecture == "llama"
    assert {t.stored_type for t in inventory.tensors if t.quantizable} == {"F16"}
    again, notes_again = model_stage.run(pipeline.context, recipe.model)
    assert again == base and logs == ["done  model" + logs[0].split("model", 1)[1], "skip  model"]
    assert "3 underflow to zero" in notes[0] and notes_again == notes  # kept when skipped
    pipeline.close()


def test_a_dataset_file_edited_in_place_is_noticed(tmp_path, tiny_model):
    """Same size, same mtime, other words: the data stage is keyed by content, not by its options."""
    from tbpw.run import recipe as recipes
    from tbpw.run.pipeline import Pipeline
    from tbpw.stages import data

    text = tmp_path / "text.txt"
    text.write_text("".join(f"Paragraph {i} says the first thing.\n\n" for i in range(50)), encoding="utf-8")
    stamp = text.stat()
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={text}",
            f"datasets.evaluation.options.path={text}", "datasets.calibration.options.split=all",
            "datasets.evaluation.options.split=all", f"output_dir={tmp_path / 'run'}"]

    def stage_of_calibration() -> tuple[list[str], str]:
        logs: list[str] = []
        recipe = recipes.load(RECIPE, sets)
        pipeline = Pipeline(recipe, log=logs.append)
        try:
            made = data.run(pipeline.context, "calibration", recipe.datasets["calibration"])
        finally:
            pipeline.close()
        return [line.split()[0] for line in logs if line.split()[1] == "data-calibration"], made.path.read_text()

    assert stage_of_calibration()[0] == ["done"]
    assert stage_of_calibration()[0] == ["skip"]
    text.write_text(text.read_text().replace("first", "other"), encoding="utf-8")
    os.utime(text, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert text.stat().st_size == stamp.st_size and text.stat().st_mtime_ns == stamp.st_mtime_ns
    ran, content = stage_of_calibration()
    assert ran == ["done"] and "the other thing" in content and "the first thing" not in content


def test_a_second_run_is_refused_and_ctrl_c_keeps_what_finished(tmp_path, tiny_model, wiki_text):
    out = tmp_path / "tiny"
    args = ["run", str(RECIPE), *_args(_sets(tiny_model, wiki_text, out))]
    proc = subprocess.Popen([sys.executable, "-m", "tbpw.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300  # a hang guard, not a speed claim
    while not (out / "baseline" / "manifest.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never finished its baseline stage"
        time.sleep(0.1)
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 2, second.output
    assert second.stderr.count("\n") == 1
    assert second.stderr.startswith(f"error: output_dir {out} is in use by pid {proc.pid} on {socket.gethostname()} (")
    assert second.stderr.endswith(": wait for that run to finish, or give this one another output_dir\n")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and f"finished stage(s) are kept in {out}; run the same command again" in last
    assert not list(out.glob(".*.partial")) and not list(out.rglob("*.tmp"))
    assert (out / "baseline" / "manifest.json").is_file()  # what finished stays (resuming: the test above)
