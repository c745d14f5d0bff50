"""The two test models made by testmodels/: they convert, run in llama-imatrix and llama-perplexity, and quantize.

- tests/fixtures/tiny-llama-hf (python -m testmodels.make_tiny_llama): a trained llama whose rows are multiples of 256;
- tests/fixtures/tiny-moe-hf (python -m testmodels.make_tiny_moe): a Gemma 4 mixture-of-experts with 3-D expert tensors.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from tbpw.data import assets
from tbpw.llamacpp.convert import convert_hf, missing_modules
from tbpw.llamacpp.tools import run_tool
from tbpw.model.inventory import ModelInventory

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LLAMA = FIXTURES / "tiny-llama-hf"
MOE = FIXTURES / "tiny-moe-hf"
# What llama-quantize falls back to when a row does not fit a K-quant's 256-element blocks.
FALLBACK_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}


@pytest.mark.parametrize("folder", [LLAMA, MOE], ids=["llama", "moe"])
def test_fixture_is_small_and_complete(folder: Path) -> None:
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"config.json", "model.safetensors"} <= set(files)
    assert "tokenizer.model" in files or "tokenizer.json" in files
    assert sum(files.values()) < 10 * 1024 * 1024


@pytest.mark.parametrize("folder,notes", [(LLAMA, "TRAINING.md"), (MOE, "MODEL.md")], ids=["llama", "moe"])
def test_notes_give_the_committed_files_digests(folder: Path, notes: str) -> None:
    """Each script records the sha256 of what it wrote: the committed files are still exactly those."""
    import hashlib

    listed = dict(re.findall(r"- `([^`]+)`: `([0-9a-f]{64})`", (folder / notes).read_text()))
    assert set(listed) == {p.name for p in folder.iterdir() if p.name != notes}
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


def test_convert_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tbpw.errors import TbpwError
    from tbpw.llamacpp import convert

    with pytest.raises(TbpwError, match="is not a Hugging Face model folder \\(no config.json\\)"):
        convert_hf(tmp_path, tmp_path / "out.gguf")
    real_find_spec = convert.importlib.util.find_spec
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None if name in ("torch", "transformers") else real_find_spec(name))
    with pytest.raises(TbpwError, match=r"needs torch, transformers: pip install 'tbpw\[convert\]'"):
        convert_hf(LLAMA, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    """About 20 kB of held-out Wikipedia text (the models were trained on the calibration side only)."""
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(assets.wiki_split().evaluation.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


def _convert(folder: Path, out: Path) -> Path:
    if missing := missing_modules():
        pytest.skip(f"the convert extra is not installed ({', '.join(missing)})")
    return convert_hf(folder, out, outtype="f16").output


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory) -> Path:
    return _convert(LLAMA, tmp_path_factory.mktemp("llama") / "tiny-llama-f16.gguf")


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory) -> Path:
    return _convert(MOE, tmp_path_factory.mktemp("moe") / "tiny-moe-f16.gguf")


def _imatrix(model: Path, text: Path, out: Path) -> dict[str, np.ndarray]:
    run_tool("llama-imatrix", ["-m", model, "-f", text, "-c", 256, "--chunks", 4, "-t", 2, "-o", out],
             log_path=out.with_suffix(".log"))
    return {t.name: np.array(t.data, dtype=np.float64) for t in GGUFReader(out).tensors}


def _perplexity(model: Path, text: Path, log: Path) -> float:
    out = run_tool("llama-perplexity", ["-m", model, "-f", text, "-c", 256, "--chunks", 4, "-t", 2], log_path=log).output
    match = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    assert match, "llama-perplexity printed no final estimate"
    return float(match.group(1))


def _quantize(model: Path, imatrix: Path, qtype: str, out: Path) -> dict[str, str]:
    run_tool("llama-quantize", ["--imatrix", imatrix, model, out, qtype, 2], log_path=out.with_suffix(".log"))
    return ModelInventory.load(out).types()


@pytest.mark.tools
@pytest.mark.slow
def test_tiny_llama_converts_with_rows_that_fit_every_type(llama_gguf: Path) -> None:
    inv = ModelInventory.load(llama_gguf)
    types = inv.types()
    assert inv.architecture == "llama"
    assert inv["token_embd.weight"].shape == (256, 4096) and "output.weight" not in types  # tied embeddings
    weights = [t for t in inv.tensors if t.quantizable]
    assert len(weights) == 1 + 4 * 7
    assert all(t.row_length % 256 == 0 for t in weights) and {types[t.name] for t in weights} == {"F16"}
    assert inv["blk.0.ffn_down.weight"].shape == (768, 256)
    reader = GGUFReader(llama_gguf)
    assert "tokenizer.ggml.model" in reader.fields and len(reader.fields["tokenizer.ggml.tokens"].data) == 4096


@pytest.mark.tools
@pytest.mark.slow
def test_tiny_llama_runs_imatrix_perplexity_and_quantizes(llama_gguf: Path, eval_text: Path, tmp_path: Path) -> None:
    imatrix = _imatrix(llama_gguf, eval_text, tmp_path / "imatrix.gguf")
    counts = {k[: -len(".counts")]: v for k, v in imatrix.items() if k.endswith(".counts")}
    assert len(counts) == 28 and {float(v.sum()) for v in counts.values()} == {1024.0}  # 4 chunks x 256 tokens
    ppl = _perplexity(llama_gguf, eval_text, tmp_path / "ppl.log")
    assert 1 < ppl < 1000  # trained: far better than the 4096 of guessing uniformly
    for qtype, expected in (("Q4_K_M", {"Q4_K", "Q6_K"}), ("IQ4_XS", {"IQ4_XS", "Q6_K"})):
        out = _quantize(llama_gguf, tmp_path / "imatrix.gguf", qtype, tmp_path / f"{qtype}.gguf")
        quantized = {t for name, t in out.items() if name.endswith(".weight") and "norm" not in name}
        assert quantized <= expected and not quantized & FALLBACK_TYPES  # no row needed a fallback type
        assert _perplexity(tmp_path / f"{qtype}.gguf", eval_text, tmp_path / f"ppl-{qtype}.log") < ppl * 1.5


@pytest.mark.tools
@pytest.mark.slow
def test_tiny_moe_converts_with_3d_expert_tensors(moe_gguf: Path) -> None:
    inv = ModelInventory.load(moe_gguf)
    assert inv.architecture == "gemma4"
    for layer in (0, 1):
        gate_up = inv[f"blk.{layer}.ffn_gate_up_exps.weight"]
        down = inv[f"blk.{layer}.ffn_down_exps.weight"]
        assert gate_up.shape == (256, 512, 4) and down.shape == (256, 256, 4)
        assert gate_up.n_experts == down.n_experts == 4 and gate_up.quantizable and down.quantizable
    assert all(t.row_length % 256 == 0 for t in inv.tensors if t.quantizable)


@pytest.mark.tools
@pytest.mark.slow
def test_tiny_moe_imatrix_counts_each_expert(moe_gguf: Path, eval_text: Path, tmp_path: Path) -> None:
    imatrix = _imatrix(moe_gguf, eval_text, tmp_path / "imatrix.gguf")
    tokens = float(imatrix["blk.0.ffn_gate_inp.weight.counts"].sum())
    assert tokens == 1024.0
    for layer in (0, 1):
        for name in ("ffn_gate_up_exps", "ffn_down_exps"):
            counts = imatrix[f"blk.{layer}.{name}.weight.counts"].reshape(-1)
            assert counts.shape == (4,) and (counts > 0).all()
            assert counts.sum() == 2 * tokens  # each token goes to its top-2 experts
            assert imatrix[f"blk.{layer}.{name}.weight.in_sum2"].shape == (4, 256)  # one row of sums per expert
        # both expert tensors of a layer see the same routing
        assert (imatrix[f"blk.{layer}.ffn_gate_up_exps.weight.counts"] == imatrix[f"blk.{layer}.ffn_down_exps.weight.counts"]).all()
    ppl = _perplexity(moe_gguf, eval_text, tmp_path / "ppl.log")
    assert math.isfinite(ppl) and ppl > 1
    types = _quantize(moe_gguf, tmp_path / "imatrix.gguf", "Q4_K_M", tmp_path / "q4km.gguf")
    assert {types[f"blk.{i}.ffn_gate_up_exps.weight"] for i in (0, 1)} == {"Q4_K"}
    assert {types[f"blk.{i}.ffn_down_exps.weight"] for i in (0, 1)} <= {"Q4_K", "Q6_K"}
    assert math.isfinite(_perplexity(tmp_path / "q4km.gguf", eval_text, tmp_path / "ppl-q.log"))


@pytest.mark.slow
def test_a_failed_conversion_is_one_line_with_the_log(tmp_path: Path) -> None:
    from tbpw.errors import TbpwError

    if missing := missing_modules():
        pytest.skip(f"the convert extra is not installed ({', '.join(missing)})")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"], "model_type": "nope"}')
    with pytest.raises(TbpwError, match=r"convert_hf_to_gguf.py failed on .*model: .*NoSuchModelForCausalLM.* \(log: .*out.gguf.convert.log\)") as err:
        convert_hf(model, tmp_path / "out.gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "out.gguf").exists()
    assert "NoSuchModelForCausalLM" in (tmp_path / "out.gguf.convert.log").read_text()
