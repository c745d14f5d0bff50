"""The ctypes bridge to libggml-base: traits, argument checks, and bytes equal to llama-quantize's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from tbpw.errors import TbpwError
from tbpw.imatrix.reader import Imatrix
from tbpw.llamacpp.tools import run_tool
from tbpw.model.inventory import ModelInventory
from testmodels.gguf_writers import write_llama_like

pytestmark = pytest.mark.tools


@pytest.fixture(scope="module")
def lib():
    from tbpw.llamacpp import ggml

    return ggml.load()


def test_traits_come_from_the_library_and_match_gguf(lib):
    from tbpw.model.ggml_types import MISSING_FROM_GGUF

    for name, t in lib.types.items():
        if name in MISSING_FROM_GGUF:  # newer than the gguf package: tbpw's own table must agree with the library
            _, blck, size = MISSING_FROM_GGUF[name]
        else:
            blck, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert (t.block_size, t.type_size) == (blck, size), name
        assert lib.row_bytes(name, 4 * 256) == 4 * 256 // blck * size
    assert lib.traits("q4_k").nominal_bpw == 4.5
    # libggml insists on importance weights for exactly these; stock llama-quantize for more
    assert {n for n, t in lib.types.items() if t.requires_imatrix} == {"IQ1_S", "IQ2_XXS", "IQ2_XS"}
    assert lib.traits("IQ3_XXS").stock_requires_imatrix and not lib.traits("Q2_K").stock_requires_imatrix


def test_bad_arguments_raise_instead_of_aborting(lib):
    rows = np.ones((4, 256), dtype=np.float32)
    with pytest.raises(TbpwError, match="do not fit Q4_K blocks"):
        lib.quantize("Q4_K", np.ones((4, 200), dtype=np.float32))
    with pytest.raises(TbpwError, match="2-D"):
        lib.quantize("Q4_K", np.ones(256, dtype=np.float32))
    with pytest.raises(TbpwError, match="importance weights have shape"):
        lib.quantize("Q4_K", rows, np.ones(128, dtype=np.float32))
    with pytest.raises(TbpwError, match="without an imatrix"):
        lib.quantize("IQ2_XXS", rows)
    with pytest.raises(TbpwError, match="NaN"):
        lib.quantize("Q4_K", rows, np.full(256, np.nan, dtype=np.float32))
    with pytest.raises(TbpwError, match="cannot be quantized"):
        lib.quantize("Q8_K", rows)
    with pytest.raises(TbpwError, match="whole number"):
        lib.dequantize("Q4_K", np.zeros(100, dtype=np.uint8), 256)


def test_roundtrip_shapes_and_exact_types(lib):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 512)).astype(np.float16).astype(np.float32)
    assert np.array_equal(lib.roundtrip("F16", x), x)  # F16 values survive F16 exactly
    assert np.array_equal(lib.roundtrip("F32", x), x)
    q = lib.quantize("Q4_K", x)
    assert q.shape == (3, 2 * 144) and q.dtype == np.uint8
    assert lib.validate("Q4_K", q)
    y = lib.dequantize("Q4_K", q, 512)
    assert y.shape == x.shape
    err = float(((y - x) ** 2).sum() / (x ** 2).sum())
    assert 1e-4 < err < 2e-2  # a 4.5-bit type: a small but non-zero error
    # quantizing rows one by one gives the same bytes as all at once (rows are independent)
    w = rng.random(512).astype(np.float32) + 0.1
    assert np.array_equal(np.concatenate([lib.quantize("IQ3_S", x[i:i + 1], w) for i in range(3)]), lib.quantize("IQ3_S", x, w))


def _tensor_type_file(path: Path, mapping: dict[str, str]) -> Path:
    path.write_text("".join(f"^{re.escape(name)}$={t}\n" for name, t in mapping.items()))
    return path


def _quantize(model: Path, mapping: dict[str, str], out: Path, imatrix: Path | None) -> GGUFReader:
    args = ["--tensor-type-file", _tensor_type_file(out.with_suffix(".types.txt"), mapping)]
    if imatrix is not None:
        args = ["--imatrix", imatrix, *args]
    run_tool("llama-quantize", [*args, model, out, "Q8_0", "2"], log_path=out.with_suffix(".log"))
    return GGUFReader(out)


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [True, False])
def test_bridge_bytes_equal_llama_quantize(lib, tiny_model, stock_imatrix, run_dir, with_imatrix):
    inv = ModelInventory.load(tiny_model)
    imx = Imatrix.load(stock_imatrix) if with_imatrix else None
    types = (["Q4_K", "IQ2_XXS", "Q6_K", "IQ4_XS", "Q3_K", "IQ3_S", "Q5_0", "IQ1_M", "Q2_K", "Q4_1"] if with_imatrix
             else ["Q4_K", "Q6_K", "IQ4_XS", "Q3_K", "IQ3_S", "Q5_0", "Q2_K", "Q4_1", "IQ4_NL", "Q8_0"])
    quantizable = [t for t in inv.tensors if t.quantizable]
    mapping = {t.name: ("Q5_K" if t.name == "token_embd.weight" else types[i % len(types)]) for i, t in enumerate(quantizable)}
    out = _quantize(tiny_model, mapping, run_dir / "out.gguf", stock_imatrix if with_imatrix else None)
    checked = 0
    for t in out.tensors:
        if t.name not in mapping:
            continue
        assert t.tensor_type.name == mapping[t.name]
        weights = imx.importance(t.name)[0] if imx is not None and t.name in imx else None
        ours = lib.quantize(mapping[t.name], inv.rows(t.name), weights)
        assert np.array_equal(ours.reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name
        checked += 1
    assert checked == len(quantizable) == 29


@pytest.mark.slow
def test_inventory_bytes_equal_quantized_tensor_data_with_fallbacks(tiny_model, run_dir):
    # 288-wide rows do not fit 256-blocks (K and IQ types fall back); 200-wide ffn_down rows fit no block (F16)
    model = write_llama_like(run_dir / "odd.gguf", tiny_model, n_embd=288, n_ff=200)
    inv = ModelInventory.load(model)
    types = ["Q4_K", "Q6_K", "Q3_K", "Q5_K", "Q2_K", "IQ4_XS", "Q8_0"]
    quantizable = [t for t in inv.tensors if t.quantizable]
    mapping = {t.name: types[i % len(types)] for i, t in enumerate(quantizable)}
    out = _quantize(model, mapping, run_dir / "odd-q.gguf", None)
    written = {t.name: t.tensor_type.name for t in out.tensors}
    assert {n: written[n] for n in mapping} == {n: inv[n].effective_type(t) for n, t in mapping.items()}
    assert written["blk.0.ffn_down.weight"] == "F16" and written["token_embd.weight"] == "Q5_0"
    assert inv.tensor_bytes(mapping) == sum(int(t.n_bytes) for t in out.tensors)
