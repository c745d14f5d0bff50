"""The types the pinned build has beyond the fork's 20 (Q1_0, Q2_0, MXFP4, NVFP4): their facts, where stock
llama-quantize writes them, and a plan that uses them end to end (bridge bytes == written bytes, the model runs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from instances import measure

from tbpw.allocate.plan import make_plan
from tbpw.allocate.service import Planner
from tbpw.errors import TbpwError
from tbpw.imatrix.reader import Imatrix
from tbpw.llamacpp import ggml
from tbpw.llamacpp.perplexity import base_logits, kld
from tbpw.llamacpp.quantize import tensor_type_text
from tbpw.llamacpp.tools import run_tool
from tbpw.measure import candidates
from tbpw.model import gguf_layout
from tbpw.model.budget import Target
from tbpw.model.ggml_types import STOCK_EXTRA_TYPES, can_write, effective_type, nominal_bpw, type_id, type_name
from tbpw.model.inventory import ModelInventory
from testmodels.gguf_writers import write_llama_like


def test_facts_of_the_types_beyond_the_fork():
    assert [nominal_bpw(t) for t in STOCK_EXTRA_TYPES] == [1.125, 2.25, 4.25, 4.5]
    assert type_id("Q2_0") == 42 and type_name(42) == "Q2_0" and type_name("q2_0") == "Q2_0"  # unknown to gguf 0.19
    # rows of real models: 384, 576, 640 and 896 are multiples of 64, not of 256
    for row in (384, 576, 640, 896):
        assert effective_type("Q2_0", row) == "Q2_0" and effective_type("Q2_K", row) == "Q4_0"
        assert effective_type("NVFP4", row) == "NVFP4" and effective_type("Q4_K", row) == "Q5_0"
    assert effective_type("Q1_0", 640) == "Q1_0" and not can_write("Q1_0", 576)
    assert effective_type("Q2_0", 288) == "Q4_0" and effective_type("MXFP4", 200) == "F16"
    with pytest.raises(TbpwError, match="no fallback for it"):
        effective_type("Q1_0", 576)


def test_candidates_leave_out_types_without_a_fallback():
    from tbpw.model.inventory import TensorInfo

    def info(row: int) -> TensorInfo:
        return TensorInfo("blk.0.ffn_up.weight", (row, 64), "F16", 0, row * 64 * 2, True, 0, "ffn_up")

    types = ["Q1_0", "Q2_0", "MXFP4", "NVFP4", "Q4_K"]
    assert candidates.for_tensor(info(640), types) == ["Q5_0", "MXFP4", "NVFP4", "Q1_0", "Q2_0"]
    assert candidates.for_tensor(info(576), types) == ["Q5_0", "MXFP4", "NVFP4", "Q2_0"]
    assert candidates.for_tensor(info(288), types) == ["Q4_0", "Q5_0", "MXFP4"]
    assert candidates.normalize_types(["q2_0", "mxfp4"]) == ("Q2_0", "MXFP4")


@pytest.mark.tools
def test_the_bridge_quantizes_the_new_types(active_build):
    lib = ggml.load()
    for t in STOCK_EXTRA_TYPES:
        assert lib.traits(t).block_size * nominal_bpw(t) == 8 * lib.traits(t).type_size
    x = np.random.default_rng(0).standard_normal((4, 640)).astype(np.float32)
    errors = {t: float(((lib.roundtrip(t, x) - x) ** 2).sum() / (x ** 2).sum()) for t in STOCK_EXTRA_TYPES}
    # the 4-bit ones are far better than the 1- and 2-bit ones (Q2_0 rounds to multiples of the block's largest
    # magnitude, which leaves most weights at 0: on Gaussian rows it is worse than Q1_0's signs)
    assert max(errors["MXFP4"], errors["NVFP4"]) < 0.05 < 0.2 < min(errors["Q1_0"], errors["Q2_0"]) < 1


@pytest.mark.tools
def test_a_plan_with_the_new_types_quantizes_loads_and_matches_the_bridge(tiny_model, stock_imatrix, wiki_text, run_dir):
    table = measure(tiny_model, stock_imatrix, metric="wmse", candidates=STOCK_EXTRA_TYPES, progress=False,
                    cache_dir=run_dir / "cache")
    planner = Planner(tiny_model, stock_imatrix, threads=2)
    problem = planner.problem(table, Target.parse(bpw=4.5))
    # every new type on some tensors (round robin over the decidable ones)
    choice = {u.name: STOCK_EXTRA_TYPES[i % len(STOCK_EXTRA_TYPES)] for i, u in enumerate(problem.tensors)}
    plan = make_plan(planner.inventory, problem, choice, allocator="round-robin", metadata_bytes=planner.metadata_bytes(problem.target, "round-robin", {}))
    out = run_dir / "new-types.gguf"
    applied = planner.write(plan, out, log_path=run_dir / "quantize.log")  # checks every tensor's type

    written = {t.name: t for t in gguf_layout.read(out).tensors}
    inv, imx, lib = ModelInventory.load(tiny_model), Imatrix.load(stock_imatrix), ggml.load()
    for name, t in choice.items():
        assert written[name].tensor_type.name == t
        weights = imx.importance(name)[0] if name in imx else None
        ours = lib.quantize(t, inv.rows(name), weights)
        assert np.array_equal(ours.reshape(-1), written[name].data.reshape(-1).view(np.uint8)), name
        assert written[name].n_bytes == inv[name].bytes_as(t) == next(c.bytes for c in table.by_name()[name].candidates
                                                                        if c.type == t)
    assert sum(t.n_bytes for t in written.values()) == plan.total_bytes
    assert out.stat().st_size == plan.file_bytes == applied.file_bytes and applied.achieved_bpw == plan.achieved_bpw

    # llama-perplexity loads and runs it on the CPU
    base = base_logits(tiny_model, wiki_text, run_dir / "base.logits", ctx=128, chunks=2, threads=2,
                       log_path=run_dir / "base.log")
    score = kld(out, base, threads=2, log_path=run_dir / "kld.log")
    assert math.isfinite(score.ppl) and 0 < score.kld_mean < 5


@pytest.mark.tools
def test_stock_falls_back_from_q2_0_and_stops_on_q1_0_where_rows_do_not_fit(tiny_model, run_dir):
    model = write_llama_like(run_dir / "odd.gguf", tiny_model, n_embd=288, n_ff=384, n_layer=1)
    types = run_dir / "types.txt"
    types.write_text(tensor_type_text({"blk.0.attn_q.weight": "Q2_0", "blk.0.ffn_down.weight": "Q1_0",
                                       "blk.0.ffn_up.weight": "MXFP4"}))
    run_tool("llama-quantize", ["--tensor-type-file", types, model, run_dir / "ok.gguf", "Q8_0", "2"],
             log_path=run_dir / "ok.log")
    written = {t.name: t.tensor_type.name for t in gguf_layout.read(run_dir / "ok.gguf").tensors}
    inv = ModelInventory.load(model)
    assert written["blk.0.attn_q.weight"] == inv["blk.0.attn_q.weight"].effective_type("Q2_0") == "Q4_0"
    assert written["blk.0.ffn_down.weight"] == "Q1_0"  # 384 = 3 x 128
    assert written["blk.0.ffn_up.weight"] == "MXFP4"
    types.write_text(tensor_type_text({"blk.0.attn_q.weight": "Q1_0"}))
    run = run_tool("llama-quantize", ["--tensor-type-file", types, model, run_dir / "bad.gguf", "Q8_0", "2"],
                   log_path=run_dir / "bad.log", check=False)
    assert run.returncode != 0 and "no tensor type fallback is defined for type q1_0" in run.output
    assert not can_write("Q1_0", 288)
