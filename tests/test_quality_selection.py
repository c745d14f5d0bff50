"""The quality levers: choice among plans by calibration KLD, and proxy errors calibrated to measured KLD.

The tools tests run the real llama.cpp binaries on the tiny model, with wiki-sample.txt cut into a
calibration part and an evaluation part.
"""

from __future__ import annotations

import math

import pytest
from instances import allocate, allocator

from tbpw.allocate.problem import build_problem
from tbpw.allocate.service import Planner
from tbpw.errors import TbpwError
from tbpw.llamacpp import perplexity
from tbpw.llamacpp import quantize as quantize_mod
from tbpw.measure.table import CandidateError, ErrorTable, TensorErrors
from tbpw.model.budget import Target
from tbpw.model.inventory import ModelInventory
from tbpw.select import calibrate
from tbpw.select.choose import PlanCandidate, select_plan
from tbpw.select.options import CalibrateOptions, ChooseOptions
from tbpw.select.scoring import Scorer
from testmodels.training import bench_model

PROBE_EACH_ROLE = CalibrateOptions(probes=["Q3_K"], grouping="role", ctx=128, chunks=2)


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Every llama.cpp command the selection runs, (tool, arguments), while still running it for real."""
    calls: list[tuple[str, list[str]]] = []
    for module in (perplexity, quantize_mod):
        real = module.run_tool

        def spy(tool, args, *a, _real=real, **kw):
            calls.append((tool, [str(x) for x in args]))
            return _real(tool, args, *a, **kw)

        monkeypatch.setattr(module, "run_tool", spy)
    return calls


@pytest.mark.tools
def test_selection_scores_on_calibration_text_only(tiny_model, stock_imatrix, fork_error_table, split_text, tmp_path,
                                                   monkeypatch):
    cal, ev = split_text
    planner = Planner(tiny_model, stock_imatrix, threads=2)
    target = Target.parse(bpw=4.5)
    problem = planner.problem(fork_error_table, target)
    candidates = [PlanCandidate(name, planner.plan(fork_error_table, target, allocator(name), problem=problem))
                  for name in ("knapsack", "greedy", "lagrangian")]
    calls = _record(monkeypatch)

    sel = select_plan(candidates, planner, cal, tmp_path / "select",
                      ChooseOptions(ctx=128, chunks=3, screen_chunks=0))

    perplexity_runs = [args for tool, args in calls if tool == "llama-perplexity"]
    texts = [args[args.index("-f") + 1] for args in perplexity_runs if "-f" in args]
    assert texts == [str(cal)], "only the baseline logits run reads a text, and it reads the calibration file"
    assert all(str(ev) not in " ".join(args) for _, args in calls), "no command names the evaluation text"
    scored = [args for args in perplexity_runs if "--kl-divergence" in args]
    assert len(scored) == len(sel.scores) == len(candidates) - len(sel.duplicates)
    assert sel.base is not None and sel.base.text == cal
    assert sel.best == min(sel.scores, key=lambda n: sel.scores[n].kld_mean)
    assert all(math.isfinite(s.kld_mean) and s.kld_mean >= 0 for s in sel.scores.values())
    assert sel.path.is_file() and ModelInventory.load(sel.path).bpw() == pytest.approx(sel.plan.achieved_bpw)
    assert [p.name for p in (tmp_path / "select").glob("*.gguf")] == [sel.path.name]


@pytest.mark.tools
def test_sensitivity_scales_are_finite_positive_and_cached(tiny_model, stock_imatrix, fork_error_table, split_text, tmp_path,
                                                           monkeypatch):
    cal, _ = split_text
    cache = tmp_path / "sens"
    scorer = Scorer(tiny_model, cal, imatrix=stock_imatrix, ctx=128, chunks=2, threads=2, cache_dir=tmp_path / "scores")
    sens = calibrate.calibrate(tiny_model, stock_imatrix, cal, fork_error_table, PROBE_EACH_ROLE, threads=2,
                                 cache_dir=cache, scorer=scorer)
    assert sens.meta["cached"] is False
    scales = sens.group_scales()
    roles = {t.role for t in ModelInventory.load(tiny_model).tensors if t.quantizable}
    assert set(scales) == roles
    # one KLD run per role; none for the floor, which a float background makes the float model itself (0)
    assert scorer.runs == len(roles) and sens.floor_kld == 0.0
    assert all(math.isfinite(v["Q3_K"]) and v["Q3_K"] > 0 for v in scales.values())
    # quantizing the embeddings alone to Q3_K must change the output more than quantizing nothing
    assert sens.measured["token_embd"]["Q3_K"] > 0

    calibrated = calibrate.calibrated_table(fork_error_table, sens)
    by_name = calibrated.by_name()
    for entry in fork_error_table.tensors:
        info = ModelInventory.load(tiny_model)[entry.name]
        for before, after in zip(entry.candidates, by_name[entry.name].candidates):
            assert after.error == pytest.approx(before.error * scales[info.role]["Q3_K"])

    def no_tools(*args, **kwargs):
        raise AssertionError("a cached calibration ran a tool")

    monkeypatch.setattr(perplexity, "run_tool", no_tools)
    monkeypatch.setattr(quantize_mod, "run_tool", no_tools)
    again = calibrate.calibrate(tiny_model, stock_imatrix, cal, fork_error_table, PROBE_EACH_ROLE, threads=2,
                                  cache_dir=cache)
    assert again.meta["cached"] is True and again.group_scales() == scales


def _sens(measured: dict[str, dict[str, float]], proxy: dict[str, dict[str, float]],
          probe_bpw: dict[str, dict[str, float]]) -> calibrate.Sensitivity:
    return calibrate.Sensitivity(tuple(next(iter(measured.values()))), "tensor", {g: [g] for g in measured},
                                   measured, proxy, probe_bpw, 0.0)


def test_scale_is_log_linear_between_probes_and_flat_outside():
    sens = _sens({"a": {"Q2_K": 8.0, "Q4_K": 2.0}}, {"a": {"Q2_K": 1.0, "Q4_K": 1.0}},
                 {"a": {"Q2_K": 2.625, "Q4_K": 4.5}})
    assert sens.scale_at("a", 2.0) == pytest.approx(8.0)
    assert sens.scale_at("a", 6.0) == pytest.approx(2.0)
    assert sens.scale_at("a", (2.625 + 4.5) / 2) == pytest.approx(4.0)  # geometric middle


def test_unmeasurable_group_gets_a_small_positive_scale():
    sens = _sens({"a": {"Q3_K": 4.0}, "b": {"Q3_K": 1.0}, "c": {"Q3_K": -1e-6}},
                 {"a": {"Q3_K": 1.0}, "b": {"Q3_K": 1.0}, "c": {"Q3_K": 1.0}},
                 {g: {"Q3_K": 3.4375} for g in "abc"})
    scales = sens.group_scales()
    assert scales["a"]["Q3_K"] == 4.0 and scales["b"]["Q3_K"] == 1.0
    assert 0 < scales["c"]["Q3_K"] < 1.0


def test_calibrated_table_needs_every_tensor():
    sens = _sens({"a": {"Q3_K": 1.0}}, {"a": {"Q3_K": 1.0}}, {"a": {"Q3_K": 3.4375}})
    table = ErrorTable([TensorErrors("b", 256, [CandidateError("Q3_K", 110, 1.0)])])
    with pytest.raises(Exception, match="no scale for b"):
        calibrate.calibrated_table(table, sens)


def test_training_text_loses_lines_the_evaluation_text_has():
    shared = "Climate type is dominated by the winter season, a long, bitterly cold period."
    evaluation = f"Town B\n{shared}\nshort line\n"
    training = f"Town A\n{shared}\nOther text about town A that is long enough to be checked.\nshort line\n"
    with pytest.raises(AssertionError, match="evaluation lines are in the training text"):
        bench_model.assert_held_out(training, evaluation)
    cleaned, dropped = bench_model.drop_shared_lines(training, evaluation)
    assert dropped == 1 and shared not in cleaned and "short line" in cleaned
    assert bench_model.assert_held_out(cleaned, evaluation) == 1


def test_a_gpu_trained_benchmark_model_is_cached_apart_from_the_cpu_reference(tmp_path):
    assert bench_model.settings_for("cpu") is bench_model.SETTINGS
    cuda = bench_model.settings_for("cuda")
    assert cuda["device"] == "cuda" and bench_model.settings_key(cuda) != bench_model.settings_key()
    with pytest.raises(TbpwError, match="unknown training device 'tpu'"):
        bench_model.settings_for("tpu")
    import torch

    if not torch.cuda.is_available():  # this CPU torch refuses at once, before reading any text
        with pytest.raises(TbpwError, match="needs a CUDA build of torch"):
            bench_model.train(tmp_path / "hf", cuda)
        assert not (tmp_path / "hf").exists()


def test_proxy_of_a_type_the_table_dropped_is_interpolated():
    entry = TensorErrors("t", 256, [CandidateError("Q2_K", 84, 8.0), CandidateError("Q4_K", 144, 2.0)])
    assert calibrate.proxy_at(entry, "Q4_K", 4.5) == 2.0
    middle = (8.0 * 84 / 256 + 8.0 * 144 / 256) / 2
    assert calibrate.proxy_at(entry, "Q3_K", middle) == pytest.approx(4.0)
    assert calibrate.proxy_at(entry, "Q8_0", 8.5) == 2.0


def _greedy_choice(model, table):
    """The 4.5-bpw problem of `model` and greedy's answer to it, tensor -> type."""
    inventory = ModelInventory.load(model)
    problem = build_problem(inventory, table, Target.parse(bpw=4.5))
    types = allocate(inventory, problem, "greedy").types()
    return problem, {u.name: types[u.members[0].name] for u in problem.tensors}


def test_swap_moves_stay_within_the_budget_and_come_cheapest_first(tiny_model, fork_error_table):
    from tbpw.select.refine import swap_moves

    problem, choice = _greedy_choice(tiny_model, fork_error_table)
    moves = swap_moves(problem, choice)
    assert moves, "a plan that is not at the ends of every tensor's range has swaps"
    assert [m[0] for m in moves] == sorted(m[0] for m in moves)
    for _, a, ta, b, tb in moves[:50]:
        trial = dict(choice, **{a: ta, b: tb})
        assert a != b and problem.total_bytes(trial) <= problem.budget
        units = problem.by_name()
        assert units[a].bytes_as(ta) > units[a].bytes_as(choice[a]) and units[b].bytes_as(tb) < units[b].bytes_as(choice[b])


def test_swap_moves_never_leave_more_than_the_floor_unspent(tiny_model, fork_error_table):
    from tbpw.select.refine import swap_moves

    problem, choice = _greedy_choice(tiny_model, fork_error_table)
    every = swap_moves(problem, choice)
    used = problem.total_bytes(choice)
    floor = used - 1  # only swaps that spend at least what they free (less one byte) stay
    kept = swap_moves(problem, choice, floor)
    freeing = [m for m in every if problem.total_bytes(dict(choice, **{m[1]: m[2], m[3]: m[4]})) < floor]
    assert freeing, "on this plan some swaps free more than they spend"
    assert len(kept) == len(every) - len(freeing)
    for _, a, ta, b, tb in kept:
        assert floor <= problem.total_bytes(dict(choice, **{a: ta, b: tb})) <= problem.budget
