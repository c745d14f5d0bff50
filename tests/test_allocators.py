"""The built-in allocators: budgets, optimality of the knapsack, the fork's rules in lagrangian, fork-native."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from instances import allocate

from tbpw.allocate.problem import (
    AllocationContext,
    AllocationProblem,
    Candidate,
    DecidableTensor,
    Member,
    build_problem,
    reachable_bpw,
)
from tbpw.errors import TbpwError
from tbpw.model.budget import Target
from tbpw.model.ggml_types import FORK_TYPES, nominal_bpw
from tbpw_plugins.allocators.knapsack import Knapsack
from tbpw_plugins.allocators.lagrangian import Lagrangian, lower_hull
from testmodels.problems import moe_like_problem

ALLOCATORS = ("lagrangian", "knapsack", "greedy")


def _targets(inventory, table, n: int, high: float | None = None) -> list[float]:
    lo, hi = reachable_bpw(build_problem(inventory, table, Target(bpw=4.0)))
    top = hi if high is None else min(high, hi)
    return [float(x) for x in np.linspace(math.ceil(lo * 1e6) / 1e6, math.floor(top * 1e6) / 1e6, n)]


def _problem(units: list[list[tuple[str, int, float]]], budget: int, names: list[str] | None = None) -> AllocationProblem:
    """A problem made directly from candidate lists (allocators need nothing else)."""
    tensors = []
    for i, cands in enumerate(units):
        name = names[i] if names else f"t{i}"
        rows = 256
        member = Member(name, 256, rows, {t: e for t, _, e in cands})
        tensors.append(DecidableTensor(name, 256 * rows, tuple(sorted((Candidate(t, b, e, 8.0 * b / (256 * rows))
                                                                        for t, b, e in cands), key=lambda c: c.bytes)),
                                       None, name.split(".")[-2] if "." in name else name, 1, (member,)))
    return AllocationProblem(tuple(tensors), budget, sum(t.n_elements for t in tensors), 0, False, Target(bpw=4.0))


# --- every allocator respects the budget -------------------------------------------------------------------


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_never_above_the_target_from_cheapest_to_largest(inventory, full_table, allocator):
    for target in _targets(inventory, full_table, 40):
        plan = allocate(inventory, build_problem(inventory, full_table, Target(bpw=target)), allocator)
        assert plan.achieved_bpw <= target
        assert plan.total_bytes <= math.floor(target * inventory.n_elements / 8)


def test_lands_within_0005_bpw_of_the_target(inventory, full_table):
    # Where the type ladder is dense (up to Q6_K's 6.56 bpw) every target is met within 0.005 bpw; above
    # it the tiny model's next steps (Q6_K -> Q8_0 -> BF16) are 0.03-0.3 bpw apart, which no mix can split.
    worst = 0.0
    for target in _targets(inventory, full_table, 120, high=6.56):
        problem = build_problem(inventory, full_table, Target(bpw=target))
        plan = allocate(inventory, problem, "knapsack", {"window_bpw": 0.005})
        assert 0.0 <= target - plan.achieved_bpw <= 0.005, target
        worst = max(worst, target - plan.achieved_bpw)
    assert worst > 0.001  # the test spans targets that really need the window


@pytest.mark.parametrize("allocator", [*ALLOCATORS, "knapsack-window"])
def test_same_inputs_same_plan(inventory, full_table, allocator):
    name, options = ("knapsack", {"window_bpw": 0.005}) if allocator == "knapsack-window" else (allocator, {})
    problem = build_problem(inventory, full_table, Target(bpw=3.9))
    first = allocate(inventory, problem, name, options).to_json()
    again = allocate(inventory, build_problem(inventory, full_table, Target(bpw=3.9)), name, options).to_json()
    assert first == again


# --- the knapsack is optimal ---------------------------------------------------------------------------


def test_knapsack_matches_exhaustive_search():
    rng = random.Random(7)
    for trial in range(12):
        units = []
        for _i in range(5):
            sizes = sorted(rng.sample(range(100, 4000, 7), 4))
            errors = sorted((rng.uniform(0, 100) for _ in sizes), reverse=rng.random() < 0.7)  # not always monotone
            units.append([(t, b, e) for t, b, e in zip(("Q2_K", "Q4_K", "Q6_K", "Q8_0"), sizes, errors)])
        lo = sum(min(b for _, b, _ in u) for u in units)
        hi = sum(max(b for _, b, _ in u) for u in units)
        for budget in np.linspace(lo, hi, 9).astype(int):
            problem = _problem(units, int(budget))
            best = min(sum(c[2] for c in combo) for combo in itertools.product(*units)
                       if sum(c[1] for c in combo) <= budget)
            choice = Knapsack(Knapsack.Options()).allocate(problem)
            assert problem.total_bytes(choice) <= budget
            assert problem.total_error(choice) == pytest.approx(best, rel=1e-12), (trial, budget)


@pytest.mark.parametrize("table_name", ["fork_table", "full_table"])
def test_knapsack_never_worse_than_lagrangian_or_greedy(inventory, request, table_name):
    table = request.getfixturevalue(table_name)
    others = [("lagrangian", {}), ("lagrangian", {"fork_rules": False}), ("greedy", {})]
    strictly_better = 0
    for target in _targets(inventory, table, 60):
        problem = build_problem(inventory, table, Target(bpw=target))
        best = allocate(inventory, problem, "knapsack")
        for name, options in others:
            other = allocate(inventory, problem, name, options)
            assert best.total_error <= other.total_error * (1 + 1e-12) + 1e-12, (target, name, options)
            strictly_better += best.total_error < other.total_error * (1 - 1e-9)
    assert strictly_better > 20  # it is not merely equal


@pytest.mark.slow
@pytest.mark.parametrize("bpw", [2.5, 4.5])
def test_knapsack_is_exact_on_a_moe_sized_problem(bpw):
    """Its speed on this problem is a benchmark (benchmarks/speed.py), not a test."""
    problem = moe_like_problem(bpw)
    solver = Knapsack(Knapsack.Options())
    choice = solver.allocate(problem)
    assert solver.exact  # proven optimal after Lagrangian reduction, despite ~6.6 M exact buckets
    assert problem.total_bytes(choice) <= problem.budget
    from tbpw_plugins.allocators.greedy import Greedy

    assert problem.total_error(choice) <= problem.total_error(Greedy(Greedy.Options()).allocate(problem))
    assert problem.total_error(choice) <= problem.total_error(Lagrangian(Lagrangian.Options(fork_rules=False)).allocate(problem))


def test_knapsack_with_coarse_buckets_stays_feasible(inventory, full_table):
    problem = build_problem(inventory, full_table, Target(bpw=4.4))
    exact = Knapsack(Knapsack.Options())
    coarse = Knapsack(Knapsack.Options(max_buckets=1024))
    best, rough = exact.allocate(problem), coarse.allocate(problem)
    assert exact.exact
    assert problem.total_bytes(rough) <= problem.budget
    assert problem.total_error(best) <= problem.total_error(rough) <= problem.total_error(best) * 1.05


# --- lagrangian: the fork's rules ------------------------------------------------------------------------


def test_the_fork_state_holds_lower_hulls(fork_table):
    # the fork stores each tensor's candidates after its own simplification; applying ours changes nothing
    for tensor in fork_table.tensors:
        cands = [Candidate(c.type, c.bytes, c.error, c.bpw) for c in tensor.candidates]
        assert lower_hull(cands) == cands, tensor.name


def test_lower_hull_drops_dominated_and_non_convex_points():
    pts = [Candidate("IQ1_S", 100, 10.0, 1), Candidate("IQ2_XXS", 200, 9.9, 2), Candidate("Q3_K", 300, 3.0, 3),
           Candidate("Q4_K", 350, 3.5, 3.5), Candidate("Q5_K", 400, 1.0, 4)]
    # Q4_K: more error than the cheaper Q3_K; IQ2_XXS: above the chord IQ1_S - Q3_K
    assert [c.type for c in lower_hull(pts)] == ["IQ1_S", "Q3_K", "Q5_K"]


def test_boosts_follow_the_fork_above_and_below_the_taper(inventory, fork_table):
    solver = Lagrangian(Lagrangian.Options())
    high = solver.boosts(build_problem(inventory, fork_table, Target(bpw=4.0)))
    share = 1048576 / sum(t.n_elements for t in inventory.tensors if t.quantizable)
    assert high["token_embd.weight"] == pytest.approx(2.5 * (1 - 3 * (share - 0.10)))  # tied, 23.5% of the weights
    assert high["blk.0.ffn_down.weight"] == 6.0 and high["blk.2.attn_v.weight"] == 1.25
    assert high["blk.0.attn_q.weight"] == 1.0 and high["blk.0.ffn_up.weight"] == 1.0
    low = solver.boosts(build_problem(inventory, fork_table, Target(bpw=2.0)))
    # under 2.2 bpw the ffn_down boost becomes an error weighting and the tied embedding loses its boost
    assert low["blk.0.ffn_down.weight"] == 1.0 and low["token_embd.weight"] == 1.0
    assert low["blk.0.attn_v.weight"] == 1.25
    plain = Lagrangian(Lagrangian.Options(fork_rules=False)).boosts(build_problem(inventory, fork_table, Target(bpw=4.0)))
    assert set(plain.values()) == {1.0}


def test_boosts_change_the_solution(inventory, fork_table):
    problem = build_problem(inventory, fork_table, Target(bpw=3.25))
    fork = Lagrangian(Lagrangian.Options()).allocate(problem)
    plain = Lagrangian(Lagrangian.Options(fork_rules=False)).allocate(problem)
    favoured = [n for n in fork if "ffn_down" in n or "attn_v" in n]
    assert sum(problem.by_name()[n].candidate(fork[n]).bytes for n in favoured) > \
        sum(problem.by_name()[n].candidate(plain[n]).bytes for n in favoured)


def test_dense_ffn_down_cap_raises_starved_layers():
    # 8 dense layers; ffn_down of layers 6 and 7 barely lose anything when squeezed, so the solver starves them
    types = [("IQ1_S", 12800), ("IQ2_XXS", 16896), ("Q3_K", 28160), ("Q4_K", 36864), ("Q5_K", 45056), ("Q6_K", 53760)]
    units, names = [], []
    for layer in range(8):
        scale = 0.001 if layer >= 6 else 1.0
        units.append([(t, b, scale * 1000.0 * 2.0 ** (-1.5 * nominal_bpw(t))) for t, b in types])
        names.append(f"blk.{layer}.ffn_down.weight")
        units.append([(t, b, 50.0 * 2.0 ** (-1.5 * nominal_bpw(t))) for t, b in types])
        names.append(f"blk.{layer}.attn_q.weight")
    budget = sum(36864 for _ in units)  # 4.5 bpw on average
    problem = _problem(units, budget, names)
    capped = Lagrangian(Lagrangian.Options()).allocate(problem)
    uncapped = Lagrangian(Lagrangian.Options(dense_ffn_down_cap=False)).allocate(problem)
    bpw = {t: nominal_bpw(t) for t, _ in types}
    down = sorted(bpw[uncapped[f"blk.{i}.ffn_down.weight"]] for i in range(8))
    median = 0.5 * (down[3] + down[4])
    assert median - bpw[uncapped["blk.7.ffn_down.weight"]] > 2.0  # starved without the cap
    fill = min((t for t in FORK_TYPES if nominal_bpw(t) >= median),
               key=lambda t: (nominal_bpw(t), 0 if t.endswith("_K") else 1 if t.startswith("IQ") else 2))
    assert capped["blk.7.ffn_down.weight"] == capped["blk.6.ffn_down.weight"] == fill
    assert problem.total_bytes(capped) <= budget


def test_expert_down_cap_at_low_bpw():
    types = [("IQ1_S", 12800), ("IQ2_XXS", 16896), ("IQ2_S", 20992), ("IQ3_XXS", 25088), ("Q4_K", 36864)]
    units, names = [], []
    for layer in range(4):
        for role, weight in (("ffn_gate_exps", 1.0), ("ffn_up_exps", 1.0), ("ffn_down_exps", 40.0)):
            units.append([(t, b, weight * 100.0 * 2.0 ** (-2.0 * nominal_bpw(t))) for t, b in types])
            names.append(f"blk.{layer}.{role}.weight")
    budget = int(sum(16896 for _ in units) * 1.05)  # ~2.1 bpw: under the taper
    problem = _problem(units, budget, names)
    capped = Lagrangian(Lagrangian.Options()).allocate(problem)
    uncapped = Lagrangian(Lagrangian.Options(expert_down_cap=False)).allocate(problem)
    bpw = {t: 8.0 * b / 65536 for t, b in types}

    def mean(choice, role):
        return sum(bpw[choice[f"blk.{i}.{role}.weight"]] for i in range(4)) / 4

    assert mean(uncapped, "ffn_down_exps") > max(mean(uncapped, "ffn_gate_exps"), mean(uncapped, "ffn_up_exps"))
    sibling = max(mean(capped, "ffn_gate_exps"), mean(capped, "ffn_up_exps"))
    assert all(bpw[capped[f"blk.{i}.ffn_down_exps.weight"]] <= sibling for i in range(4))
    assert problem.total_bytes(capped) <= budget


# --- fork-native -------------------------------------------------------------------------------------


@pytest.mark.tools
def test_fork_native_needs_the_fork(inventory, fork_table, tiny_model, fork_imatrix):
    problem = build_problem(inventory, fork_table, Target(bpw=4.0),
                            context=AllocationContext(model=tiny_model, imatrix=fork_imatrix))
    with pytest.raises(TbpwError, match=r"has no --target-bpw .*fork-native.*tbpw build --source fork"):
        allocate(inventory, problem, "fork-native")


def test_fork_native_needs_paths(inventory, fork_table):
    with pytest.raises(TbpwError, match="model and imatrix paths"):
        allocate(inventory, build_problem(inventory, fork_table, Target(bpw=4.0)), "fork-native")


# --- on a table measured by tbpw.measure -----------------------------------------------------------------


@pytest.fixture(scope="module")
def measured_table(tiny_model, stock_imatrix, tmp_path_factory):
    from instances import measure

    return measure(tiny_model, stock_imatrix, sampling={"scale": 0.25}, progress=False,
                   cache_dir=tmp_path_factory.mktemp("measure-cache"))


@pytest.mark.tools
@pytest.mark.slow
def test_on_a_measured_table(inventory, measured_table):
    for target in _targets(inventory, measured_table, 50):
        problem = build_problem(inventory, measured_table, Target(bpw=target))
        best = allocate(inventory, problem, "knapsack")
        windowed = allocate(inventory, problem, "knapsack", {"window_bpw": 0.005})
        assert best.achieved_bpw <= target and windowed.achieved_bpw <= target
        if target <= 6.56:  # the dense part of the type ladder, see test_lands_within_0005_bpw_of_the_target
            assert target - windowed.achieved_bpw <= 0.005, target
        for name, options in (("lagrangian", {}), ("lagrangian", {"fork_rules": False}), ("greedy", {})):
            other = allocate(inventory, problem, name, options)
            assert other.achieved_bpw <= target
            assert best.total_error <= other.total_error * (1 + 1e-12) + 1e-12, (target, name, options)


def test_fork_state_file_is_keyed_by_imatrix_and_build(tiny_model, fork_imatrix, stock_imatrix, tmp_path, monkeypatch):
    """The fork keys its state file on the model alone; tbpw's cached one changes with the imatrix and the build."""
    from dataclasses import replace

    from tbpw.llamacpp.build import BuildInfo
    from tbpw.llamacpp.quantize import fork_state_path

    monkeypatch.setenv("TBPW_HOME", str(tmp_path))
    build = BuildInfo(key="k1", root=tmp_path, source_name="fork", source_identity="x", build_number=0,
                      build_commit="a50ddb6", backend="cpu", cmake_flags=(), seconds=0.0)
    one = fork_state_path(tiny_model, fork_imatrix, build)
    assert one == fork_state_path(tiny_model, fork_imatrix, build) and one.parent == tmp_path / "fork-state"
    assert one != fork_state_path(tiny_model, stock_imatrix, build)
    assert one != fork_state_path(tiny_model, fork_imatrix, replace(build, key="k2"))
    assert one != fork_state_path(tiny_model, fork_imatrix, build, {"output.weight": "Q8_0"})
