"""Applying a plan with stock llama-quantize: the tensor-type file, the run, and the verification."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import pytest
from click.testing import CliRunner
from instances import allocate

from tbpw.allocate.apply import apply_plan, plan_path_for, verify_output
from tbpw.allocate.problem import build_problem
from tbpw.errors import TbpwError
from tbpw.llamacpp.quantize import (
    output_metadata_bytes,
    tensor_pattern,
    tensor_type_text,
)
from tbpw.measure import forkstate
from tbpw.model.budget import Target
from tbpw.model.inventory import ModelInventory


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the tensor-type file ----------------------------------------------------------------------------


NAMES = ["blk.0.attn_k.weight", "blk.10.attn_k.weight", "blk.1.attn_k.weight", "blk.0.attn_k.weight2",
         "xblk.0.attn_k.weight", "blk.0.attn_kXweight", "Blk.0.Attn_K.Weight", "a b=c+d(e)[f]*?^$|\\g",
         "token_embd.weight", "blk.0.ffn_down_exps.weight"]


@pytest.mark.parametrize("name", NAMES)
def test_pattern_matches_only_its_tensor_after_lower_casing(name):
    pattern = tensor_pattern(name)
    # llama-quantize lower-cases the pattern and searches it in the name (ECMAScript; \xHH and \. agree with re)
    compiled = re.compile(pattern.lower())
    assert [n for n in NAMES if compiled.search(n)] == [name]
    assert pattern.startswith("^") and pattern.endswith("$")
    assert not re.search(r"[\sA-Z=]", pattern)  # nothing the file format or lower-casing would change


def test_non_ascii_names_are_refused():
    with pytest.raises(TbpwError, match="non-ASCII"):
        tensor_pattern("blk.0.ättn.weight")


def test_tensor_type_text_is_one_token_per_tensor():
    text = tensor_type_text({"blk.0.attn_k.weight": "Q4_K", "Tok En": "IQ2_XXS"})
    assert text.split() == [r"^blk\.0\.attn_k\.weight$=q4_k", r"^\x54ok\x20\x45n$=iq2_xxs"]


# --- applying with the real llama-quantize -------------------------------------------------------------


@pytest.mark.tools
def test_apply_writes_the_plan_and_is_deterministic(inventory, full_table, tiny_model, stock_imatrix, tmp_path):
    problem = build_problem(inventory, full_table, Target(bpw=4.3))
    plan = allocate(inventory, problem, "knapsack")
    first = apply_plan(plan, tiny_model, stock_imatrix, tmp_path / "a" / "out.gguf", threads=2)
    written = ModelInventory.load(first.path)
    assert {t.name: t.stored_type for t in written.tensors} == plan.types()
    assert written.bpw() == plan.achieved_bpw == first.achieved_bpw
    assert first.achieved_bpw <= 4.3
    assert first.file_bytes == first.path.stat().st_size == written.file_bytes()
    saved = json.loads(plan_path_for(first.path).read_text())
    assert saved["tensors"] == plan.to_json()["tensors"] and saved["allocator"] == "knapsack"
    entries = first.tensor_type_file.read_text().split()
    assert len(entries) == sum(t.quantizable for t in inventory.tensors)
    # same inputs, byte-identical file (imatrix given by the same path: llama-quantize records it)
    second = apply_plan(allocate(inventory, build_problem(inventory, full_table, Target(bpw=4.3)), "knapsack"),
                        tiny_model, stock_imatrix, tmp_path / "b" / "out.gguf", threads=1)
    assert _sha(first.path) == _sha(second.path)
    assert plan_path_for(first.path).read_text() == plan_path_for(second.path).read_text()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out.gguf", "out.plan.json", "out.quantize.log",
                                                                   "out.tensor-types.txt"]


@pytest.mark.tools
def test_a_file_that_differs_from_the_plan_is_an_error(inventory, full_table, tiny_model, stock_imatrix, tmp_path):
    plan = allocate(inventory, build_problem(inventory, full_table, Target(bpw=5.0)), "greedy")
    applied = apply_plan(plan, tiny_model, stock_imatrix, tmp_path / "out.gguf")
    tensors = list(plan.tensors)
    i = next(i for i, t in enumerate(tensors) if t.name == "blk.1.attn_q.weight")
    other = "Q8_0" if tensors[i].type != "Q8_0" else "Q6_K"
    tensors[i] = dataclasses.replace(tensors[i], type=other, bytes=inventory["blk.1.attn_q.weight"].bytes_as(other))
    with pytest.raises(TbpwError, match=r"wrote blk.1.attn_q.weight as .*, the plan says " + other):
        verify_output(dataclasses.replace(plan, tensors=tuple(tensors)), applied.path)


@pytest.mark.tools
def test_overrides_need_a_quantized_base_and_a_failed_check_leaves_no_file(inventory, full_table, tiny_model,
                                                                          stock_imatrix, tmp_path):
    plan = allocate(inventory, build_problem(inventory, full_table, Target(bpw=4.0)), "knapsack")
    out = tmp_path / "out.gguf"
    # with an F16 base, stock llama-quantize ignores every --tensor-type override: the check must catch it
    with pytest.raises(TbpwError, match="wrote .* as F16"):
        apply_plan(plan, tiny_model, stock_imatrix, out, base_type="F16")
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".out.gguf*"))


@pytest.mark.tools
@pytest.mark.parametrize("size", ["2000k", "2.6m"])
def test_size_target_is_a_real_file_size(inventory, full_table, tiny_model, fork_imatrix, tmp_path, size):
    from tbpw.model.budget import parse_size

    metadata = output_metadata_bytes(tiny_model, fork_imatrix)
    problem = build_problem(inventory, full_table, Target.parse(size=size), metadata_bytes=metadata)
    plan = allocate(inventory, problem, "knapsack", metadata_bytes=metadata)
    applied = apply_plan(plan, tiny_model, fork_imatrix, tmp_path / "out.gguf")
    assert ModelInventory.load(applied.path).metadata_bytes == metadata  # the estimate is exact
    assert applied.file_bytes == plan.file_bytes <= parse_size(size)
    assert parse_size(size) - applied.file_bytes < 0.005 * inventory.n_elements / 8


@pytest.mark.tools
def test_cli_writes_and_verifies(tiny_model, fork_imatrix, fork_tiny_dir, tmp_path, plugin_manager):
    from tbpw.cli import main

    out = tmp_path / "q.gguf"
    args = ["quantize", str(tiny_model), "--imatrix", str(fork_imatrix), "--target-bpw", "3.5", "--fork-state",
            str(fork_tiny_dir / "tiny.bpw_state"), "--allocator", "lagrangian", "--json", "-o", str(out)]
    dry = CliRunner().invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert not out.exists()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verified"] is True and data["output"] == str(out)
    assert json.loads(dry.stdout)["file_bytes"] == data["file_bytes"] == out.stat().st_size  # predicted exactly
    written = ModelInventory.load(out)
    assert written.bpw() == data["achieved_bpw"] <= 3.5
    assert {t["name"]: t["type"] for t in data["tensors"]} == {t.name: t.stored_type for t in written.tensors}
    state = forkstate.read(fork_tiny_dir / "tiny.bpw_state").by_name()
    for t in data["tensors"]:
        if t["name"] in state:
            assert t["error"] == next(c.error for c in state[t["name"]].candidates if c.type == t["type"])


@pytest.mark.tools
def test_cli_measures_when_no_table_is_given(tiny_model, stock_imatrix, tmp_path, plugin_manager):
    from tbpw.cli import main

    out = tmp_path / "m.gguf"
    args = ["quantize", str(tiny_model), "--imatrix", str(stock_imatrix), "--target-bpw", "5.1",
            "--types", "Q3_K,Q4_K,Q5_K,Q6_K,Q8_0", "--metric", "wmse", "--metric-option", "trim_fraction=0.02", "--cache-dir", str(tmp_path / "cache"),
            "--json", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verified"] is True and data["achieved_bpw"] <= 5.1
    assert {t["type"] for t in data["tensors"]} <= {"F32", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}
    assert all(t["error"] is not None for t in data["tensors"] if t["source"] == "allocator")
    assert list((tmp_path / "cache").iterdir())  # the measurement was cached where asked
