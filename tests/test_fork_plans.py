"""Fed the fork's own error table, `lagrangian` with the fork's options makes the fork's plan, and stock
llama-quantize writes that plan with the fork's achieved bpw and types.

The reference is ../shared/fixtures/fork-tiny/fork-plans.json: for six targets, the fork's type for every
tensor and its "tensor quantization mix" lines, whose arrow marks a tensor the solver boosted.
"""

from __future__ import annotations

import json

import pytest
from instances import allocate

from tbpw.allocate.apply import apply_plan
from tbpw.allocate.problem import build_problem
from tbpw.model.budget import Target
from tbpw.model.inventory import ModelInventory
from tbpw_plugins.allocators.lagrangian import Lagrangian


@pytest.fixture(scope="module")
def fork_plans(fork_tiny_dir) -> dict:
    return json.loads((fork_tiny_dir / "fork-plans.json").read_text())


TARGETS = ["2.5", "3.25", "4.0", "4.75", "5.5", "6.5"]


def test_fixture_lists_the_six_targets(fork_plans):
    assert sorted(fork_plans, key=float) == TARGETS


@pytest.mark.parametrize("target", TARGETS)
def test_lagrangian_chooses_the_forks_type_for_every_tensor(inventory, fork_table, fork_plans, target):
    reference = fork_plans[target]
    problem = build_problem(inventory, fork_table, Target(bpw=float(target)))
    plan = allocate(inventory, problem, "lagrangian")  # the defaults are the fork's options
    assert plan.types() == reference["types"]
    assert plan.total_bytes == reference["tensor_bytes"]
    assert plan.n_elements == reference["elements"]
    assert plan.achieved_bpw == reference["achieved_bpw"]
    errors = {t.name: t.error for t in plan.tensors}
    for line in reference["mix"]:
        assert round(errors[line["name"]], 4) == pytest.approx(line["error"], abs=1e-4)
        assert line["type"] == plan.types()[line["name"]]


@pytest.mark.parametrize("target", TARGETS)
def test_the_boosted_tensors_are_the_ones_the_fork_marks(inventory, fork_table, fork_plans, target):
    boosts = Lagrangian(Lagrangian.Options()).boosts(build_problem(inventory, fork_table, Target(bpw=float(target))))
    marked = {line["name"] for line in fork_plans[target]["mix"] if line["upgraded"]}
    assert {name for name, boost in boosts.items() if boost > 1.0} == marked


@pytest.mark.parametrize("target", TARGETS)
def test_without_the_forks_rules_the_plan_differs(inventory, fork_table, fork_plans, target):
    # the rules are what makes the match: the plain solver picks other types for the same errors
    problem = build_problem(inventory, fork_table, Target(bpw=float(target)))
    plain = allocate(inventory, problem, "lagrangian", {"fork_rules": False})
    assert plain.types() != fork_plans[target]["types"]
    assert plain.achieved_bpw <= float(target)


@pytest.mark.tools
@pytest.mark.parametrize("target", ["3.25", "5.5"])
def test_stock_llama_quantize_writes_the_forks_plan(inventory, fork_table, fork_plans, target, tiny_model,
                                                    fork_imatrix, tmp_path):
    reference = fork_plans[target]
    plan = allocate(inventory, build_problem(inventory, fork_table, Target(bpw=float(target))), "lagrangian")
    applied = apply_plan(plan, tiny_model, fork_imatrix, tmp_path / f"stock-{target}.gguf")
    written = ModelInventory.load(applied.path)
    assert {t.name: t.stored_type for t in written.tensors} == reference["types"]
    assert written.bpw() == reference["achieved_bpw"]
    assert written.tensor_bytes() == reference["tensor_bytes"]


@pytest.mark.tools
@pytest.mark.slow
@pytest.mark.parametrize("target", ["2.5", "4.0", "4.75", "6.5"])
def test_stock_llama_quantize_writes_the_other_fork_plans(inventory, fork_table, fork_plans, target, tiny_model,
                                                          fork_imatrix, tmp_path):
    test_stock_llama_quantize_writes_the_forks_plan(inventory, fork_table, fork_plans, target, tiny_model,
                                                    fork_imatrix, tmp_path)
