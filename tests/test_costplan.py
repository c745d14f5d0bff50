"""`tbpw run --plan` and the first lines of every run: the stages, the tool runs, the disk and the time a run
needs, known before any work; a run whose output disk lacks the room is refused before it starts.

The model size comes from what the recipe names without converting it: on the real Gemma-4-26B-A4B layout
(testmodels/synthetic_gemma4.py, written sparse: its header and a hole, no disk used) it is the model card's
25.2 B weights with 3.8 B active per token.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.run.costplan import disk_needed
from tbpw.run.recipe import read
from tbpw.select.options import ChooseOptions
from tbpw.stages.model import size as model_size
from testmodels.synthetic_gemma4 import write_model

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"


def _sets(tiny_model: Path, wiki_text: Path, out: Path) -> list[str]:
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}"]
    return [arg for s in sets for arg in ("--set", s)]


def test_the_real_layout_is_sized_from_its_tensor_table(tmp_path, wiki_text):
    model = tmp_path / "gemma4-26b-a4b.gguf"
    write_model(model, sparse=True)
    assert model.stat().st_size > 50e9 and model.stat().st_blocks * 512 < 1e6  # a hole, not 50 GB of disk
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"name: g4\nmodel: {{gguf: {model}}}\ndatasets:\n"
                           f"  calibration: {{name: file, options: {{path: {wiki_text}}}}}\n"
                           f"  evaluation: {{name: file, options: {{path: {wiki_text}}}}}\n"
                           "targets: [{bpw: 4.5}, {bpw: 6.5}]\nallocators: [{name: knapsack}, {name: lagrangian}]\n"
                           "compare_stock: [Q4_K_M]\n")
    recipe, problems = read(recipe_file)
    assert recipe is not None and not problems
    size = model_size(recipe.model)
    assert size is not None and not size.needs_copy and size.vocab == 262144
    assert round(size.n_elements / 1e9, 1) == 25.2 and round(size.n_active / 1e9, 1) == 3.8
    # a quant of a bpw target: its tensor bytes and the model's metadata; the stock file: bounded from above by every
    # tensor a type above Q4_K_M's main one (Q5_K), with the model's fallbacks
    q45, q65 = (int(bpw * size.n_elements / 8) + size.metadata_bytes for bpw in (4.5, 6.5))
    stock = size.bytes_at("Q5_K") if size.bytes_at else 0
    assert 4.5 * size.n_elements / 8 < stock < 6.0 * size.n_elements / 8  # 704-wide rows fall back to Q5_0 and Q5_1

    def within(expected: int) -> bool:  # besides the quants: tables, the imatrix, manifests, logs, the report
        return expected <= disk_needed(recipe, size) <= 1.01 * expected

    assert within(2 * (q45 + q65) + stock)  # two plans per target, one stock type
    recipe.keep = "chosen"  # one plan per target stays, and one target's other plan exists until it is deleted
    assert within(q45 + q65 + q65 + stock)
    recipe.keep = "all"
    recipe.choose = ChooseOptions()  # the chosen plan is the target's one quant; the allocators' are candidates
    assert within(q45 + q65 + stock + q65)  # and a candidate file while it is scored
    recipe.choose = ChooseOptions(measured_quants=True)  # and each allocator's plan on the measured table too
    assert within(3 * (q45 + q65) + stock + q65)


@pytest.mark.tools
def test_plan_lists_every_stage_and_writes_nothing(tiny_model, wiki_text, tmp_path):
    from tbpw.run.pipeline import Pipeline
    from tbpw.run.preflight import check

    out = tmp_path / "out"
    args = _sets(tiny_model, wiki_text, out)
    result = CliRunner().invoke(main, ["run", str(RECIPE), *args, "--plan"])
    assert result.exit_code == 0, result.output
    assert not out.exists()
    listed = re.findall(r"^(run|reuse\?|as is) +(\S+)$", result.stdout, re.M)
    recipe = check(RECIPE, [a for a in args if a != "--set"])
    graph = Pipeline(recipe, claim=None).graph()
    assert [name for _, name in listed] == [t.name for t in graph.tasks if t.name not in graph.releases]
    assert dict((name, status) for status, name in listed)["model"] == "as is"  # a float GGUF, used without a copy
    assert {status for status, name in listed if name != "model"} == {"run"}  # nothing made yet
    # 2 stock types and 2 plans (knapsack, for the stock target and for 3.5 bpw); 4 quants x 1 evaluator; 4 benches
    assert "4 quantizations, 0 KLD runs on calibration text, 4 evaluation runs, 4 llama-bench runs" in result.stdout
    assert re.search(r"^plan: disk: at least [\d.]+ [KM]iB .* in the output folder", result.stdout, re.M)
    assert re.search(r"^plan: time: roughly [\d.]+ (s|min|h) on this machine's CPU for the stages to run", result.stdout, re.M)
    assert re.search(r"^basis: one quantization of the model ~\d+ s: libggml quantizes [\d.]+ M weights/s",
                     result.stdout, re.M)


@pytest.mark.tools
def test_with_choose_each_allocators_plan_is_a_quant_only_when_asked(tiny_model, wiki_text, tmp_path):
    def plan(*sets: str) -> str:
        args = [*_sets(tiny_model, wiki_text, tmp_path / "out"), "--set", "compare_stock=[]"]
        result = CliRunner().invoke(main, ["run", str(RECIPE), *args, *(x for s in sets for x in ("--set", s)), "--plan"])
        assert result.exit_code == 0, result.output
        return result.stdout

    def quants(stdout: str) -> list[str]:
        return re.findall(r"^run +(quant-\S+)$", stdout, re.M)

    one_candidate = plan("choose={}")
    assert quants(one_candidate) == ["quant-like-Q4_K_M-choose", "quant-3.5bpw-choose"]
    assert quants(plan("choose={measured_quants: true}")) == [
        "quant-like-Q4_K_M-knapsack", "quant-like-Q4_K_M-choose", "quant-3.5bpw-knapsack", "quant-3.5bpw-choose"]
    # a lone candidate is scored once per target, on all the chunks; two go through rounds of 2 of the 16 chunks:
    # both on the first, then at most both on each of the 7 others (the rounds stop once one is left)
    assert ", 2 KLD runs on calibration text" in one_candidate
    two = plan("choose={}", "allocators=[{name: knapsack}, {name: lagrangian}]")
    assert ", at most 32 KLD runs on calibration text" in two


@pytest.mark.tools
def test_a_run_whose_disk_is_too_small_is_refused_before_any_work(tiny_model, wiki_text, tmp_path, monkeypatch):
    """The output disk is given 1 MiB free: less than the quants alone take. Nothing is made, not even the folder."""
    from tbpw.run import costplan, preflight

    real = preflight.shutil.disk_usage
    small = lambda path: real(path)._replace(free=1 << 20)  # noqa: E731
    monkeypatch.setattr(preflight.shutil, "disk_usage", small)
    monkeypatch.setattr(costplan.shutil, "disk_usage", small)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(RECIPE), *_sets(tiny_model, wiki_text, out)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"output_dir {out}: the run writes at least" in result.stderr
    assert "and its disk has 1.000 MiB (1048576 bytes) free: free space or choose another output_dir" in result.stderr
    assert not out.exists()
    # --plan still shows what the run needs, then says why it would be refused
    planned = CliRunner().invoke(main, ["run", str(RECIPE), *_sets(tiny_model, wiki_text, out), "--plan"])
    assert planned.exit_code == 2 and "plan: disk: at least" in planned.stdout
    assert planned.stderr.startswith("error: ") and "the run writes at least" in planned.stderr
    assert not out.exists()


@pytest.mark.tools
def test_the_plan_is_the_sum_of_the_stages_own_estimates(tiny_model, wiki_text, tmp_path, monkeypatch):
    """costplan knows no stage: change one stage's estimate and the plan follows, with no edit to costplan."""
    from tbpw.stages import choose
    from tbpw.stages.cost import Cost

    args = [*_sets(tiny_model, wiki_text, tmp_path / "out"), "--set", "compare_stock=[]", "--set", "choose={}", "--plan"]
    before = CliRunner().invoke(main, ["run", str(RECIPE), *args])
    assert before.exit_code == 0 and ", 2 KLD runs on calibration text" in before.stdout, before.output
    monkeypatch.setattr(choose, "cost", lambda size, choosing, calibrate: Cost(quantizations=5, klds=21))
    after = CliRunner().invoke(main, ["run", str(RECIPE), *args])
    assert after.exit_code == 0, after.output
    # two targets, each choice now estimated at 5 quantizations and 21 KLD runs; 1 stock quantization stays
    assert "11 quantizations, 42 KLD runs on calibration text" in after.stdout
