"""testmodels/synthetic_gemma4.py: the Gemma-4-26B-A4B-shaped model the scale benchmark runs on.

Its name/shape table is the converter's: fed the tiny Gemma 4 MoE fixture's config, it gives exactly the
tensors (names, shapes, types) and gemma4 keys the pinned convert_hf_to_gguf.py writes for that fixture.
At the fixture's size the generator writes a model and imatrix that tbpw and stock llama-quantize read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from tbpw.imatrix.reader import Imatrix
from tbpw.llamacpp import parsers
from tbpw.llamacpp.convert import convert_hf, missing_modules
from tbpw.llamacpp.tools import run_tool
from tbpw.model.inventory import ModelInventory
from testmodels.synthetic_gemma4 import (
    GEMMA4_26B_A4B,
    gemma4_layout,
    gemma4_metadata,
    padded_tokenizer,
    write_imatrix,
    write_model,
)

TINY_MOE = Path(__file__).resolve().parent / "fixtures" / "tiny-moe-hf"


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return json.loads((TINY_MOE / "config.json").read_text())


@pytest.mark.tools
@pytest.mark.slow
def test_layout_and_keys_are_what_the_converter_writes(tiny_config: dict, tmp_path: Path) -> None:
    if missing := missing_modules():
        pytest.skip(f"the convert extra is not installed ({', '.join(missing)})")
    converted = GGUFReader(convert_hf(TINY_MOE, tmp_path / "tiny-moe-f16.gguf", outtype="f16").output)
    real = {t.name: (tuple(int(n) for n in t.shape), int(t.tensor_type)) for t in converted.tensors}
    assert {s.name: (s.shape, s.ggml_type) for s in gemma4_layout(tiny_config)} == real
    keys = gemma4_metadata(tiny_config)
    for key, value in keys.items():
        if key != "general.name":
            assert converted.fields[key].contents() == pytest.approx(value), key
    assert {k for k in converted.fields if not k.startswith(("GGUF.", "tokenizer."))} - set(keys) == {"general.size_label"}


def test_the_real_model_has_its_published_size() -> None:
    """25.2 B parameters (the model card's total without the vision tower), 47 GiB in F16; depth scales it."""
    specs = gemma4_layout(GEMMA4_26B_A4B)
    assert round(sum(s.n_elements for s in specs) / 1e9, 1) == 25.2
    full = {s.name: s.shape for s in specs}
    assert full["blk.0.ffn_gate_up_exps.weight"] == (2816, 1408, 128) and full["blk.0.ffn_down_exps.weight"] == (704, 2816, 128)
    assert full["blk.5.attn_q.weight"] == (2816, 8192) and "blk.5.attn_v.weight" not in full  # K is V in full layers
    assert full["blk.4.attn_v.weight"] == (2816, 2048)
    two = gemma4_layout(GEMMA4_26B_A4B, layers=2)
    assert "blk.1.attn_v.weight" not in {s.name for s in two}  # the last kept layer is a full-attention one


@pytest.mark.tools
def test_generated_model_and_imatrix_are_read_by_tbpw_and_llama_quantize(tiny_config: dict, tmp_path: Path) -> None:
    model, imatrix = tmp_path / "syn.gguf", tmp_path / "syn.imatrix.gguf"
    write_model(model, config=tiny_config, seed=3)
    write_imatrix(imatrix, config=tiny_config, seed=3)
    inventory = ModelInventory.load(model)
    assert {t.name: t.shape for t in inventory.tensors} == {s.name: s.shape for s in gemma4_layout(tiny_config)}
    imx = Imatrix.load(imatrix)
    match = imx.check_against(inventory)
    assert match.missing == ["token_embd.weight"] and not match.extra and imx.has_means
    down, gate_up = (imx.counts(f"blk.0.{n}.weight") for n in ("ffn_down_exps", "ffn_gate_up_exps"))
    assert (down == gate_up).all() and down.std() > 0  # one routing per layer, uneven across experts

    weights = np.asarray(inventory.rows("blk.0.ffn_up.weight", np.arange(256)), dtype=np.float64)
    centred = weights / weights.std(axis=1, keepdims=True)
    assert (centred ** 4).mean() > 5  # heavier tails than a normal's 3
    assert weights.std(axis=1).std() / weights.std(axis=1).mean() > 0.2  # rows have their own scales

    again = tmp_path / "again.gguf"
    write_model(again, config=tiny_config, seed=3)
    assert again.read_bytes() == model.read_bytes()

    run_tool("llama-quantize", ["--imatrix", imatrix, model, tmp_path / "q.gguf", "Q4_K_M", 2],
             log_path=tmp_path / "q.log")
    types = ModelInventory.load(tmp_path / "q.gguf").types()
    assert types["blk.0.ffn_gate_up_exps.weight"] == "Q4_K"


@pytest.mark.tools
@pytest.mark.slow
def test_with_a_padded_tokenizer_the_model_runs_in_llama_perplexity(tiny_config: dict, wiki_text: Path,
                                                                      tmp_path: Path) -> None:
    """The fixture's gemma4 tokenizer, padded to a vocabulary larger than its own (as the real model's 262,144
    is), makes the generated model one the tools that run a model load: what benchmarks/flagship.py needs."""
    if missing := missing_modules():
        pytest.skip(f"the convert extra is not installed ({', '.join(missing)})")
    source = convert_hf(TINY_MOE, tmp_path / "tiny-moe-f16.gguf", outtype="f16").output
    config = {**tiny_config, "vocab_size": tiny_config["vocab_size"] + 300}
    tokenizer = padded_tokenizer(source, config["vocab_size"])
    assert len(tokenizer["tokenizer.ggml.tokens"]) == config["vocab_size"] == len(tokenizer["tokenizer.ggml.scores"])
    model = tmp_path / "syn.gguf"
    write_model(model, config=config, seed=1, tokenizer=tokenizer)
    read = GGUFReader(model)
    assert read.fields["tokenizer.ggml.model"].contents() == "gemma4"
    assert read.fields["tokenizer.ggml.tokens"].contents()[-1] == "<unused299>"
    assert read.fields["tokenizer.ggml.merges"].contents() == GGUFReader(source).fields["tokenizer.ggml.merges"].contents()
    run = run_tool("llama-perplexity", ["-m", model, "-f", wiki_text, "-c", "128", "--chunks", "2", "-t", "2"],
                   log_path=tmp_path / "ppl.log")
    ppl = parsers.parse_perplexity(run.output).ppl.value
    assert np.isfinite(ppl) and ppl > 1
