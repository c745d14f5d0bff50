"""Provenance inside every GGUF tbpw writes (llama-quantize --override-kv), its exact metadata bytes, and
`tbpw inspect` on a tbpw quant and on a stock one."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from click.testing import CliRunner
from instances import allocator

from tbpw.allocate.service import Planner
from tbpw.cli import main
from tbpw.errors import TbpwError
from tbpw.files.digest import sha256_file
from tbpw.llamacpp.perplexity import base_logits
from tbpw.llamacpp.quantize import kv_override_args, output_metadata_bytes, quantize
from tbpw.llamacpp.quantize_layout import file_type_override
from tbpw.model import gguf_layout, provenance
from tbpw.model.budget import Target
from tbpw.model.inventory import ModelInventory
from tbpw.version import __version__


def test_values_fit_what_llama_quantize_takes():
    assert provenance.clip("é" * 100) == "é" * 63  # 126 bytes: a character is never cut in two
    assert provenance.compact_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    long = provenance.compact_json({"x": "y" * 200})
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", long)
    assert provenance.record(version="1", metric="", target="4.5 bpw") == {"tbpw.version": "1", "tbpw.target": "4.5 bpw"}
    with pytest.raises(ValueError, match="no provenance field 'colour'"):
        provenance.record(colour="red")


def test_override_arguments_refuse_what_llama_quantize_would_reject_without_a_word():
    assert kv_override_args({"tbpw.target": "a=b: c"}) == ["--override-kv", "tbpw.target=str:a=b: c"]
    assert kv_override_args({"k": "x" * 127})  # the longest value it takes
    with pytest.raises(TbpwError, match="has 128 bytes; llama-quantize --override-kv takes at most 127"):
        kv_override_args({"k": "x" * 128})
    with pytest.raises(TbpwError, match="a key has 1 to 127 bytes and no '='"):
        kv_override_args({"a=b": "x"})


def test_provenance_reads_back_in_field_order():
    fields = {"general.name": "x", "tbpw.target": "4.5 bpw", "tbpw.version": "0.1.0", "tbpw.extra": 5}
    assert list(provenance.read(fields).items()) == [("version", "0.1.0"), ("target", "4.5 bpw"), ("extra", "5")]


@pytest.mark.tools
def test_keys_are_written_counted_exactly_and_the_file_still_loads(tiny_model, stock_imatrix, wiki_text, tmp_path):
    kv = provenance.record(version=__version__, target="stock Q4_K_M", calibration="wiki é " * 30)
    out = tmp_path / "q.gguf"
    quantize(tiny_model, out, imatrix=stock_imatrix, base_type="Q4_K_M", kv=kv, threads=2)
    written = gguf_layout.read(out)
    assert {k: written.fields[k] for k in kv} == kv
    assert written.data_offset == output_metadata_bytes(tiny_model, stock_imatrix, kv)
    assert base_logits(out, wiki_text, tmp_path / "q.logits", ctx=128, chunks=2, threads=2).ppl > 0


@pytest.fixture(scope="module")
def planned(tiny_model, stock_imatrix, fork_error_table, tmp_path_factory):
    """A knapsack plan for a file-size target written through the Planner, with the caller's provenance."""
    folder = tmp_path_factory.mktemp("provenance")
    planner = Planner(tiny_model, stock_imatrix, threads=2,
                      provenance={"metric": "fork", "calibration": "wiki-sample.txt", "recipe_sha256": "ab" * 32})
    size = ModelInventory.load(tiny_model).file_bytes() // 3
    plan = planner.plan(fork_error_table, Target(size=size), allocator("knapsack"))
    applied = planner.write(plan, folder / "q.gguf")
    return plan, applied, size


@pytest.mark.tools
def test_every_planned_file_records_how_it_was_made(planned, stock_imatrix, active_build):
    plan, applied, size = planned
    recorded = provenance.read(gguf_layout.read(applied.path).fields)
    assert recorded == {
        "version": __version__,
        "llama_cpp": f"b{active_build.build_number} {active_build.build_commit} {active_build.backend}",
        "target": f"{size} bytes", "allocator": "knapsack",
        "allocator_options": provenance.compact_json(plan.allocator_options), "metric": "fork",
        "recipe_sha256": "ab" * 32, "imatrix_sha256": sha256_file(stock_imatrix), "calibration": "wiki-sample.txt"}
    # the plan paid for exactly these keys, and the file lands within its size target
    assert ModelInventory.load(applied.path).metadata_bytes == plan.metadata_bytes
    assert applied.file_bytes == plan.file_bytes <= size


@pytest.mark.tools
def test_a_file_assembled_from_the_store_records_the_same_keys_as_llama_quantize(tiny_model, stock_imatrix,
                                                                                  fork_error_table, tmp_path):
    from tbpw.quantize.store import TensorStore

    planner = Planner(tiny_model, stock_imatrix, threads=2, provenance={"metric": "fork"},
                      store=TensorStore(tmp_path / "store", threads=2))
    plan = planner.plan(fork_error_table, Target(bpw=4.5), allocator("knapsack"))
    applied = planner.write(plan, tmp_path / "assembled.gguf")
    assert applied.assembled
    kv = planner.provenance_kv(plan.target, plan.allocator, plan.allocator_options)
    stock = tmp_path / "stock.gguf"
    quantize(tiny_model, stock, imatrix=stock_imatrix, tensor_type_file=applied.tensor_type_file, kv=kv, threads=2,
             overrides=[file_type_override(plan.achieved_bpw)])  # the label every plan's file gets
    assert applied.path.read_bytes() == stock.read_bytes()


@pytest.mark.tools
def test_inspect_prints_a_tbpw_quants_provenance_type_mix_and_bpw(planned):
    plan, applied, _ = planned
    result = CliRunner().invoke(main, ["inspect", str(applied.path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"bpw {plan.achieved_bpw:.6f} (8 x {plan.total_bytes} tensor bytes" in out
    for label, value in (("tbpw version", __version__), ("allocator", "knapsack"), ("error metric", "fork"),
                         ("recipe (sha256 of its resolved content)", "ab" * 32)):
        assert re.search(rf"^  {re.escape(label)} +{re.escape(value)}$", out, re.M), label
    assert "imatrix (recorded by llama-quantize):" in out and "entries_count = " in out
    data = json.loads(CliRunner().invoke(main, ["inspect", str(applied.path), "--json"]).output)
    assert data["bpw"] == plan.achieved_bpw and data["provenance"]["allocator"] == "knapsack"
    by_role = {r["role"]: r for r in data["roles"]}
    types = plan.types()
    for role, row in by_role.items():
        names = [n for n in types if ModelInventory.load(applied.path)[n].role == role]
        assert row["tensors"] == len(names) and sum(row["types"].values()) == len(names)
        assert set(row["types"]) == {types[n] for n in names}


@pytest.mark.tools
def test_inspect_shows_what_a_stock_quant_holds(tiny_model, tmp_path):
    out = tmp_path / "stock-Q4_K_M.gguf"
    quantize(tiny_model, out, imatrix=None, base_type="Q4_K_M", threads=2)
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    inventory = ModelInventory.load(out)
    assert f"bpw {inventory.bpw():.6f}" in result.output
    assert "none: tbpw did not write this file" in result.output and "imatrix: none recorded" in result.output
    row = re.search(r"^  ffn_down +4 +([\d.]+)  (.+)$", result.output, re.M)
    assert row is not None
    stored = Counter(t.stored_type for t in inventory.tensors if t.role == "ffn_down")
    mix = {part.split(" x")[0]: int(part.split(" x")[1]) if " x" in part else 1 for part in row.group(2).split(", ")}
    assert mix == stored and len(stored) > 1  # Q4_K_M mixes types within a role
    assert "types overall:" in result.output and "Q4_K" in result.output


def test_inspect_of_a_file_that_is_no_gguf_is_one_line(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and "is not a GGUF file" in result.output
    assert len(result.output.strip().splitlines()) == 1
