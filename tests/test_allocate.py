"""The allocation problem: budgets, reachable ranges, constraints, the plan and its JSON."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from instances import allocate
from tables import Cand, Entry, Table

from tbpw.allocate.constraints import Constraints
from tbpw.allocate.plan import Plan, make_plan
from tbpw.allocate.problem import AllocationProblem, build_problem, reachable_bpw
from tbpw.errors import TbpwError
from tbpw.model.budget import Target, parse_size
from tbpw.model.inventory import ModelInventory

ALLOCATORS = ("lagrangian", "knapsack", "greedy")


def _norm_bytes(inventory: ModelInventory) -> int:
    return sum(t.stored_bytes for t in inventory.tensors if not t.quantizable)


# --- sizes and targets -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("123456", 123456), ("2k", 2048), ("2kib", 2048), ("2KiB", 2048), ("1.5m", 1572864), ("1.5 MiB", 1572864),
    ("1g", 1 << 30), ("3gib", 3 << 30), ("1t", 1 << 40), ("2tib", 2 << 40), ("100b", 100), ("16GB", 16 << 30),
])
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1.5x", "-3g", "g"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(TbpwError, match="not a size"):
        parse_size(text)


def test_target_needs_exactly_one_kind():
    with pytest.raises(TbpwError, match="exactly one"):
        Target()
    with pytest.raises(TbpwError, match="exactly one"):
        Target(bpw=4.0, size=100)
    assert Target.parse(size="1k").size == 1024


# --- budgets -----------------------------------------------------------------------------------------


def test_bpw_budget_counts_all_elements_and_fixed_bytes(inventory, fork_table):
    problem = build_problem(inventory, fork_table, Target(bpw=4.0))
    # the fork: round(target * all elements / 8) - bytes of the tensors it does not decide (the norms)
    assert problem.budget == math.floor(4.0 * inventory.n_elements / 8) - _norm_bytes(inventory)
    assert problem.n_elements == inventory.n_elements
    assert {t.name for t in problem.tensors} == {t.name for t in inventory.tensors if t.quantizable}
    assert problem.tied_embeddings  # the tiny model has no output.weight


def test_bpw_budget_never_rounds_above_the_target(inventory, fork_table):
    target = 4.00000011  # target * elements / 8 has a fraction over .5
    problem = build_problem(inventory, fork_table, Target(bpw=target))
    assert 8.0 * (problem.budget + problem.fixed_bytes) / inventory.n_elements <= target


@pytest.mark.parametrize("target, which", [(1.0, "below the cheapest"), (16.5, "above the largest")])
def test_unreachable_bpw_names_the_range(inventory, fork_table, target, which):
    lo, hi = reachable_bpw(build_problem(inventory, fork_table, Target(bpw=4.0)))
    with pytest.raises(TbpwError) as info:
        build_problem(inventory, fork_table, Target(bpw=target))
    message = str(info.value)
    assert which in message
    assert f"from {math.ceil(lo * 1e4) / 1e4:.4f} to {math.floor(hi * 1e4) / 1e4:.4f} bpw" in message
    # both ends of the named range are reachable
    build_problem(inventory, fork_table, Target(bpw=math.ceil(lo * 1e4) / 1e4))
    build_problem(inventory, fork_table, Target(bpw=math.floor(hi * 1e4) / 1e4))


def test_size_target_pays_for_metadata_and_padding(inventory, full_table):
    size = parse_size("1.6m")
    problem = build_problem(inventory, full_table, Target(size=size), metadata_bytes=inventory.metadata_bytes + 320)
    for name in ALLOCATORS:
        plan = allocate(inventory, problem, name, metadata_bytes=inventory.metadata_bytes + 320)
        assert plan.file_bytes <= size
        assert plan.file_bytes == inventory.metadata_bytes + 320 + sum(-(-t.bytes // 32) * 32 for t in plan.tensors)
    with pytest.raises(TbpwError, match=r"target size .* below the cheapest file .* give a size from \d+ to \d+ bytes"):
        build_problem(inventory, full_table, Target(size=100_000))


# --- constraints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_pins_leave_the_problem_and_the_budget(inventory, full_table, allocator):
    free = build_problem(inventory, full_table, Target(bpw=4.5))
    problem = build_problem(inventory, full_table, Target(bpw=4.5), {"pins": {r"attn_v\.weight$": "q8_0"}})
    pinned = [f"blk.{i}.attn_v.weight" for i in range(4)]
    assert set(problem.pinned) == set(pinned)
    assert not set(pinned) & {t.name for t in problem.tensors}
    assert problem.budget == free.budget - 4 * inventory[pinned[0]].bytes_as("Q8_0")
    plan = allocate(inventory, problem, allocator)
    for t in plan.tensors:
        if t.name in pinned:
            assert (t.type, t.source) == ("Q8_0", "pinned")
            assert t.error == next(c.error for c in next(e for e in full_table.tensors if e.name == t.name).candidates
                                   if c.type == "Q8_0")
    assert plan.achieved_bpw <= 4.5


def test_bad_pins_are_named(inventory, full_table):
    with pytest.raises(TbpwError, match="never quantizes"):
        build_problem(inventory, full_table, Target(bpw=4.5), {"pins": {"attn_norm": "q8_0"}})
    with pytest.raises(TbpwError, match="matches no tensor"):
        build_problem(inventory, full_table, Target(bpw=4.5), {"pins": {"attn_vv": "q8_0"}})
    with pytest.raises(TbpwError, match="not a regular expression"):
        build_problem(inventory, full_table, Target(bpw=4.5), {"pins": {"attn_v(": "q8_0"}})
    with pytest.raises(TbpwError, match="pin 'attn_v': 'q9_k' is not a ggml type"):
        build_problem(inventory, full_table, Target(bpw=4.5), {"pins": {"attn_v": "q9_k"}})
    with pytest.raises(TbpwError, match=r"allowed_types\['ffn_.\*'\]: 'Q4_KM' is not a ggml type"):
        build_problem(inventory, full_table, Target(bpw=4.5), {"allowed_types": {"ffn_.*": ["Q4_KM"]}})


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_allowed_types_and_bpw_bounds_hold_for_every_allocator(inventory, full_table, allocator):
    rules = {"allowed_types": {"ffn_.*": ["Q4_K", "Q5_K", "Q6_K", "Q8_0"]},
             "min_bpw": {"attn_v": 5.0}, "max_bpw": {"token_embd": 4.5, "attn_q|attn_k": 3.5}}
    for target in (4.0, 5.0, 6.0):
        plan = allocate(inventory, build_problem(inventory, full_table, Target(bpw=target), rules), allocator)
        for t in (t for t in plan.tensors if t.source == "allocator"):
            bpw = 8.0 * t.bytes / inventory[t.name].n_elements
            role = inventory[t.name].role
            if role.startswith("ffn_"):
                assert t.type in ("Q4_K", "Q5_K", "Q6_K", "Q8_0")
            if role == "attn_v":
                assert bpw >= 5.0
            if role in ("token_embd",):
                assert bpw <= 4.5
            if role in ("attn_q", "attn_k"):
                assert bpw <= 3.5
        assert plan.achieved_bpw <= target


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_share_type_groups_get_one_type_per_layer(inventory, full_table, allocator):
    problem = build_problem(inventory, full_table, Target(bpw=3.7), {"share_type": [["ffn_gate", "ffn_up"]]})
    groups = [t for t in problem.tensors if t.is_group]
    assert [g.name for g in groups] == [f"blk.{i}.ffn_gate.weight+blk.{i}.ffn_up.weight" for i in range(4)]
    gate = next(e for e in full_table.tensors if e.name == "blk.0.ffn_gate.weight")
    up = next(e for e in full_table.tensors if e.name == "blk.0.ffn_up.weight")
    q4k = groups[0].candidate("Q4_K")
    assert q4k.bytes == 2 * inventory["blk.0.ffn_gate.weight"].bytes_as("Q4_K")
    assert q4k.error == pytest.approx(next(c.error for c in gate.candidates if c.type == "Q4_K")
                                      + next(c.error for c in up.candidates if c.type == "Q4_K"))
    plan = allocate(inventory, problem, allocator)
    types = plan.types()
    for i in range(4):
        assert types[f"blk.{i}.ffn_gate.weight"] == types[f"blk.{i}.ffn_up.weight"]
    assert plan.achieved_bpw <= 3.7


def test_constraints_that_leave_nothing_are_an_error(inventory, full_table):
    with pytest.raises(TbpwError, match="leave no candidate type for blk.0.attn_v.weight"):
        build_problem(inventory, full_table, Target(bpw=4.0), {"min_bpw": {"attn_v": 40}})
    with pytest.raises(TbpwError, match="no option|constraint 'pinz'"):
        Constraints.parse({"pinz": {}})


# --- the table must belong to the model ----------------------------------------------------------------


def test_a_table_of_another_model_is_refused(inventory, full_table):
    short = Table(full_table.tensors[1:])
    with pytest.raises(TbpwError, match="no entry for token_embd.weight"):
        build_problem(inventory, short, Target(bpw=4.0))
    first = full_table.tensors[0]
    wrong = Table((Entry(first.name, first.n_elements * 2, first.candidates), *full_table.tensors[1:]))
    with pytest.raises(TbpwError, match="belongs to another model"):
        build_problem(inventory, wrong, Target(bpw=4.0))
    bad_bytes = Table((Entry(first.name, first.n_elements, (Cand("Q4_K", 1, 1.0),)), *full_table.tensors[1:]))
    with pytest.raises(TbpwError, match="belongs to another model"):
        build_problem(inventory, bad_bytes, Target(bpw=4.0))


# --- the plan ----------------------------------------------------------------------------------------


def test_plan_covers_every_tensor_and_round_trips(inventory, fork_table):
    plan = allocate(inventory, build_problem(inventory, fork_table, Target(bpw=4.0)), "knapsack")
    assert [t.name for t in plan.tensors] == [t.name for t in inventory.tensors]
    assert plan.total_bytes == inventory.tensor_bytes(plan.types())
    assert plan.achieved_bpw == inventory.bpw(plan.types())
    fixed = [t for t in plan.tensors if t.source == "fixed"]
    assert {t.name for t in fixed} == {t.name for t in inventory.tensors if not t.quantizable}
    assert all(t.type == "F32" and t.error is None for t in fixed)
    data = json.loads(json.dumps(plan.to_json()))
    for key in ("target_bpw", "achieved_bpw", "total_bytes", "allocator", "tensors"):
        assert key in data
    assert set(data["tensors"][0]) >= {"name", "type", "bytes", "error"}
    assert data["allocator"] == "knapsack" and data["target_bpw"] == 4.0
    assert Plan.from_json(data).to_json() == data


def _problem_of(inventory, table, bpw) -> AllocationProblem:
    return build_problem(inventory, table, Target(bpw=bpw))


def test_make_plan_checks_the_allocator(inventory, fork_table):
    problem = _problem_of(inventory, fork_table, 3.0)
    cheapest = {t.name: t.candidates[0].type for t in problem.tensors}
    make_plan(inventory, problem, cheapest, allocator="test")
    largest = {t.name: t.candidates[-1].type for t in problem.tensors}
    with pytest.raises(TbpwError, match="over the budget"):
        make_plan(inventory, problem, largest, allocator="test")
    with pytest.raises(TbpwError, match="gave no type for"):
        make_plan(inventory, problem, dict(list(cheapest.items())[1:]), allocator="test")
    with pytest.raises(TbpwError, match="not a ggml type"):
        make_plan(inventory, problem, {**cheapest, "token_embd.weight": "Q9_9"}, allocator="test")


# --- the command line, without writing a model -------------------------------------------------------------


def _cli():
    from tbpw.cli import main

    return main


def test_dry_run_json_prints_one_plan_object(tiny_model, fork_imatrix, fork_tiny_dir, tmp_path, plugin_manager):
    args = [str(tiny_model), "--imatrix", str(fork_imatrix), "--target-bpw", "4.25",
            "--fork-state", str(fork_tiny_dir / "tiny.bpw_state"), "--dry-run", "--json", "--allocator", "greedy",
            "-o", str(tmp_path / "out.gguf")]
    result = CliRunner().invoke(_cli(), ["quantize", *args])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["allocator"] == "greedy" and data["target_bpw"] == 4.25
    assert data["achieved_bpw"] <= 4.25
    assert len(data["tensors"]) == 38
    assert not (tmp_path / "out.gguf").exists()
    assert json.loads((tmp_path / "out.plan.json").read_text())["tensors"] == data["tensors"]


def test_dry_run_table_and_user_errors(tiny_model, fork_imatrix, fork_tiny_dir, plugin_manager):
    base = ["quantize", str(tiny_model), "--imatrix", str(fork_imatrix), "--fork-state",
            str(fork_tiny_dir / "tiny.bpw_state"), "--dry-run"]
    result = CliRunner().invoke(_cli(), [*base, "--target-bpw", "3.5", "--pin", r"attn_v=q6_k"])
    assert result.exit_code == 0, result.output
    assert "achieved" in result.stdout and "pinned" in result.stdout and "blk.3.ffn_up.weight" in result.stdout
    result = CliRunner().invoke(_cli(), [*base, "--target-bpw", "0.5"])
    assert result.exit_code == 2
    assert "error: target 0.5 bpw is below the cheapest mix" in result.stderr
    result = CliRunner().invoke(_cli(), [*base, "--target-bpw", "3", "--target-size", "2m"])
    assert result.exit_code == 2 and "exactly one target" in result.stderr
    result = CliRunner().invoke(_cli(), [*base, "--target-bpw", "3", "--allocator", "knapsak"])
    assert result.exit_code == 2 and "did you mean 'knapsack'" in result.stderr
    result = CliRunner().invoke(_cli(), [*base, "--target-bpw", "3", "-O", "max_bucket=5"])
    assert result.exit_code == 2 and "did you mean 'max_buckets'" in result.stderr


# --- inputs that are well-formed but wrong -------------------------------------------------------------


def test_an_error_table_of_another_model_with_the_same_shapes_is_refused(tmp_path, tiny_model, stock_imatrix,
                                                                         fork_error_table, plugin_manager):
    import shutil

    from tbpw.files.digest import content_sha256
    from tbpw.measure.table import ErrorTable

    other = tmp_path / "other.gguf"  # the same tensors, one weight different: another model
    shutil.copyfile(tiny_model, other)
    inventory = ModelInventory.load(other)
    with open(other, "r+b") as fh:
        fh.seek(inventory["blk.2.ffn_up.weight"].data_offset + 1000)
        fh.write(b"\x11\x22")
    table = tmp_path / "table.json"
    ErrorTable(fork_error_table.tensors, {"model_sha256": content_sha256(tiny_model)}).write_json(table)
    base = ["--imatrix", str(stock_imatrix), "--target-bpw", "4.5", "--error-table", str(table), "--dry-run", "--json"]
    assert CliRunner().invoke(_cli(), ["quantize", str(tiny_model), *base]).exit_code == 0
    refused = CliRunner().invoke(_cli(), ["quantize", str(other), *base])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert f"error table {table} was measured on another model than {other}" in refused.stderr


def test_a_plan_that_leaves_budget_unused_says_so(inventory, full_table, plugin_manager):
    problem = build_problem(inventory, full_table, Target(bpw=6.0))
    cheapest = {t.name: t.candidates[0].type for t in problem.tensors}
    lazy = make_plan(inventory, problem, cheapest, allocator="cheapest")
    assert lazy.shortfall.startswith("lands ") and "below its target although" in lazy.shortfall
    assert "the allocator left budget unused" in lazy.shortfall
    assert Plan.from_json(json.loads(json.dumps(lazy.to_json()))).shortfall == lazy.shortfall
    exact = allocate(inventory, problem, "knapsack")
    assert exact.shortfall == "" and "shortfall" not in exact.to_json()  # an optimal plan cannot be improved so
