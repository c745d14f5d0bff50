"""The tensor store: every (tensor, type) quantized once, and a plan's GGUF assembled from it equal, byte for byte,
to what stock llama-quantize writes for the same --tensor-type-file (dense and MoE models, several plans, with
and without an imatrix, key/value overrides), and llama-quantize still the path where the store cannot write."""

from __future__ import annotations

from pathlib import Path

import pytest
from instances import allocator

from tbpw.allocate.service import Planner
from tbpw.errors import TbpwError
from tbpw.llamacpp.imatrix import make_imatrix
from tbpw.llamacpp.quantize import quantize, tensor_type_text
from tbpw.llamacpp.quantize_layout import KvOverride, output_layout, tensor_order
from tbpw.model import gguf_layout
from tbpw.model.budget import Target
from tbpw.model.inventory import ModelInventory
from tbpw.quantize import store as store_mod
from tbpw.quantize.assemble import assemble
from tbpw.quantize.store import TensorStore

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny-moe-hf"
# Types whose libggml grids build in a second or less (IQ1_S/IQ1_M/IQ2_XS/IQ2_S take 5-25 s in every process
# that writes them, llama-quantize included; tests/test_ggml_bridge.py covers IQ1_M).
SPREAD = ["Q4_K", "IQ2_XXS", "Q6_K", "IQ4_XS", "Q3_K", "IQ3_S", "Q5_0", "IQ3_XXS", "Q2_K", "Q4_1", "IQ4_NL", "Q5_K",
          "Q5_1", "Q4_0", "Q8_0", "F16", "BF16"]
NO_IMATRIX = [t for t in SPREAD if t not in ("IQ2_XXS", "IQ3_XXS")]


def _plan(inventory: ModelInventory, types: list[str]) -> dict[str, str]:
    """Every quantizable tensor gets the next type of `types` (as llama-quantize writes it after fallbacks);
    token_embd, which never has imatrix data, gets Q6_K."""
    out, quantizable = {}, [t for t in inventory.tensors if t.quantizable]
    for i, t in enumerate(quantizable):
        out[t.name] = t.effective_type("Q6_K" if t.name == "token_embd.weight" else types[i % len(types)])
    return out


def _stock(model: Path, imatrix: Path | None, types: dict[str, str], out: Path, extra: list[str] | None = None) -> bytes:
    type_file = out.with_suffix(".types.txt")
    type_file.write_text(tensor_type_text(types))
    quantize(model, out, imatrix=imatrix, tensor_type_file=type_file, threads=2, extra=extra,
             log_path=out.with_suffix(".log"))
    return out.read_bytes()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TensorStore:
    return TensorStore(tmp_path_factory.mktemp("store"), threads=2)


@pytest.fixture(scope="module")
def gemma4_moe(tmp_path_factory, wiki_text) -> tuple[Path, Path]:
    """tests/fixtures/tiny-moe-hf converted (fused gate_up experts, a shared FFN, 1-element tensors, tensors out
    of llama-quantize's order) and its stock imatrix (an expert of layer 1 gets no token: weight 1 there)."""
    from tbpw.llamacpp.convert import convert_hf, missing_modules

    if missing := missing_modules():
        pytest.skip(f"the convert extra is not installed ({', '.join(missing)})")
    folder = tmp_path_factory.mktemp("g4moe")
    model = convert_hf(FIXTURE, folder / "g4-moe-f16.gguf", outtype="f16").output
    imatrix = make_imatrix(model, wiki_text, folder / "imatrix.gguf", collector="stock", ctx=256, chunks=8,
                           threads=2).path
    return model, imatrix


@pytest.mark.tools
@pytest.mark.slow
@pytest.mark.parametrize(("imatrix_name", "plan"), [("stock_imatrix", "spread"), ("fork_imatrix", "spread"),
                                                    ("stock_imatrix", "flat"), (None, "spread")])
def test_dense_assembly_equals_llama_quantize(request, tiny_model, store, run_dir, imatrix_name, plan):
    imatrix = request.getfixturevalue(imatrix_name) if imatrix_name else None
    inventory = ModelInventory.load(tiny_model)
    types = _plan(inventory, ["Q4_K"] if plan == "flat" else SPREAD if imatrix else NO_IMATRIX)
    expected = _stock(tiny_model, imatrix, types, run_dir / "stock.gguf")
    source = store.source(tiny_model, imatrix)
    made = assemble(source, {**inventory.types(), **types}, run_dir / "assembled.gguf")
    assert (run_dir / "assembled.gguf").read_bytes() == expected
    assert made.file_bytes == len(expected)

    again = store.source(tiny_model, imatrix)  # a later process: every blob is found, nothing is quantized
    assert assemble(again, types, run_dir / "again.gguf").quantized == 0
    assert (run_dir / "again.gguf").read_bytes() == expected


@pytest.mark.tools
@pytest.mark.slow
@pytest.mark.parametrize("plan", ["spread", "flat"])
def test_moe_assembly_equals_llama_quantize(gemma4_moe, store, run_dir, plan):
    model, imatrix = gemma4_moe
    inventory = ModelInventory.load(model)
    assert any(t.is_expert for t in inventory.tensors if t.quantizable)
    types = _plan(inventory, ["Q3_K"] if plan == "flat" else SPREAD)
    experts = {types[t.name] for t in inventory.tensors if t.is_expert}
    assert len(experts) > 1 if plan == "spread" else experts == {"Q3_K"}
    expected = _stock(model, imatrix, types, run_dir / "stock.gguf")
    assemble(store.source(model, imatrix), types, run_dir / "assembled.gguf")
    assert (run_dir / "assembled.gguf").read_bytes() == expected


@pytest.mark.tools
def test_key_value_overrides_are_placed_as_llama_quantize_places_them(tiny_model, stock_imatrix, run_dir):
    overrides = ["general.name=str:tbpw test", "tbpw.level=int:-7", "general.quantized_by=str:tbpw",
                 "tbpw.ratio=float:0.25", "tbpw.flag=bool:true"]
    types = {t.name: "Q8_0" for t in ModelInventory.load(tiny_model).tensors if t.quantizable}
    expected = _stock(tiny_model, stock_imatrix, types, run_dir / "stock.gguf",
                      extra=[a for o in overrides for a in ("--override-kv", o)])
    layout = output_layout(gguf_layout.read(tiny_model), types, imatrix=stock_imatrix, overrides=overrides)
    assert expected[:len(layout.header)] == layout.header
    assert layout.file_bytes == len(expected)


@pytest.mark.tools
@pytest.mark.slow
def test_the_planner_writes_through_the_store_and_verifies(tiny_model, stock_imatrix, fork_error_table, tmp_path):
    store = TensorStore(tmp_path / "store", threads=2)
    target = Target.parse(bpw=4.5)
    with_store = Planner(tiny_model, stock_imatrix, threads=2, store=store)
    plan = with_store.plan(fork_error_table, target, allocator("knapsack"))
    applied = with_store.write(plan, tmp_path / "store.gguf")
    plain = Planner(tiny_model, stock_imatrix, threads=2).write(plan, tmp_path / "stock.gguf")
    assert applied.assembled and not plain.assembled
    assert applied.quantized == len([t for t, ty in plan.types().items()
                                     if ty != ModelInventory.load(tiny_model)[t].stored_type])
    assert (tmp_path / "store.gguf").read_bytes() == (tmp_path / "stock.gguf").read_bytes()
    assert applied.plan_path.is_file() and "tensor store" in applied.log_path.read_text()

    second = Planner(tiny_model, stock_imatrix, threads=2, store=store).write(plan, tmp_path / "again.gguf")
    assert second.assembled and second.quantized == 0


@pytest.mark.tools
def test_a_type_the_bridge_cannot_write_goes_to_llama_quantize(tiny_model, stock_imatrix, fork_error_table,
                                                                 tmp_path, monkeypatch):
    planner = Planner(tiny_model, stock_imatrix, threads=2, store=TensorStore(tmp_path / "store"))
    plan = planner.plan(fork_error_table, Target.parse(bpw=5.0), allocator("knapsack"))
    refused = sorted(set(plan.types().values()) - {"F32", "F16"})[0]
    real = store_mod.StoreSource.supports
    monkeypatch.setattr(store_mod.StoreSource, "supports", lambda self, t: t != refused and real(self, t))
    applied = planner.write(plan, tmp_path / "out.gguf")
    assert not applied.assembled
    assert "llama_model_quantize" in applied.log_path.read_text() or "quant size" in applied.log_path.read_text()
    assert not list((tmp_path / "store").rglob("*.bin")), "nothing was quantized into the store"


@pytest.mark.tools
def test_the_measurement_leaves_the_blobs_a_plan_needs(tiny_model, fork_imatrix, tmp_path):
    from instances import measure

    store = TensorStore(tmp_path / "store", threads=2)
    table = measure(tiny_model, fork_imatrix, metric="mse", candidates=["Q4_K", "Q6_K", "Q8_0"], threads=2,
                    cache_dir=tmp_path / "measure", progress=False, store=store.source(tiny_model, fork_imatrix))
    inventory = ModelInventory.load(tiny_model)
    types = {t.name: t.candidates[i % len(t.candidates)].type for i, t in enumerate(table.tensors)}
    made = assemble(store.source(tiny_model, fork_imatrix), types, tmp_path / "assembled.gguf")
    # with E[a] the fork's sampling covers every row of this model: its quantized bytes were all kept
    assert made.quantized == 0
    assert (tmp_path / "assembled.gguf").read_bytes() == _stock(tiny_model, fork_imatrix, types, tmp_path / "stock.gguf")
    assert len(list((tmp_path / "store").rglob("*.bin"))) == sum(
        len({c.type for c in t.candidates} - {inventory[t.name].stored_type}) for t in table.tensors)


@pytest.mark.tools
def test_bad_input_and_interrupted_writes(tiny_model, stock_imatrix, tmp_path):
    store = TensorStore(tmp_path / "store")
    bare = store.source(tiny_model, None)
    with pytest.raises(TbpwError, match="needs importance data"):
        bare.ensure("blk.0.ffn_down.weight", "IQ2_XXS")
    with pytest.raises(TbpwError, match="llama-quantize never quantizes"):
        bare.check("blk.0.attn_norm.weight", "Q4_K")
    source = store.source(tiny_model, stock_imatrix)
    with pytest.raises(RuntimeError, match="killed"), source.writer("blk.0.ffn_down.weight", "Q4_K") as blob:
        blob.write(b"\0" * 10)
        raise RuntimeError("killed")
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()], "nothing of a killed write is left"
    with pytest.raises(TbpwError, match="expected"), source.writer("blk.0.ffn_down.weight", "Q4_K") as blob:
        blob.write(b"\0" * 10)  # too short: never published
    assert not source.has("blk.0.ffn_down.weight", "Q4_K")
    assert store.source(tiny_model, stock_imatrix).key("blk.0.ffn_down.weight", "Q4_K") != \
        bare.key("blk.0.ffn_down.weight", "Q4_K"), "another imatrix is another blob"


def test_tensor_order_is_by_layer_then_name():
    names = ["output.weight", "blk.10.attn_q.weight", "blk.2.ffn_up.weight", "token_embd.weight", "blk.2.attn_k.weight",
             "rope_freqs.weight", "blk.1.x"]
    assert tensor_order(names) == ["output.weight", "rope_freqs.weight", "token_embd.weight", "blk.1.x",
                                   "blk.2.attn_k.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


@pytest.mark.parametrize("text", ["no-equals", "k=text", "k=int:x", "k=bool:yes", "k=str:" + "x" * 128])
def test_malformed_overrides_are_one_line_errors(text):
    with pytest.raises(TbpwError, match="override"):
        KvOverride.parse(text)
