"""The real llama.cpp tools of the active build on the tiny model, each run parsed into typed results.

imatrix -> quantize with a --tensor-type-file -> perplexity -> saved base logits -> KL divergence -> bench.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from tbpw.llamacpp import parsers
from tbpw.llamacpp.tools import run_tool
from tbpw.model.inventory import ModelInventory

pytestmark = pytest.mark.tools

THREADS = "2"
CTX = 128
CHUNKS = 6
# A different type for each role, so a pattern that matched the wrong tensor would show.
ROLE_TYPES = {"attn_q": "Q5_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "IQ4_XS",
              "ffn_gate": "Q3_K", "ffn_up": "Q5_0", "ffn_down": "Q8_0", "token_embd": "Q6_K"}


@dataclass
class Runs:
    work: Path
    imatrix_file: Path
    imatrix: parsers.ImatrixResult
    types: dict[str, str]
    quant_file: Path
    quantize: parsers.QuantizeResult
    ppl_f16: parsers.PerplexityResult
    ppl_quant: parsers.PerplexityResult
    ppl_saving_base: parsers.PerplexityResult
    kld_quant: parsers.KldResult
    kld_self: parsers.KldResult
    bench: parsers.BenchResult


@pytest.fixture(scope="module")
def runs(tmp_path_factory, active_build, tiny_model, wiki_text) -> Runs:
    work = tmp_path_factory.mktemp("tools")

    def run(parser, tool, args, log):
        return parsers.parse_run(parser, run_tool(tool, args, log_path=work / log, build=active_build))

    imatrix_file = work / "imatrix.gguf"
    imatrix = run(parsers.parse_imatrix, "llama-imatrix",
                  ["-m", tiny_model, "-f", wiki_text, "-c", CTX, "--chunks", CHUNKS, "-t", THREADS, "-o", imatrix_file],
                  "imatrix.log")
    inventory = ModelInventory.load(tiny_model)
    types = {t.name: ROLE_TYPES[t.role] for t in inventory.tensors if t.quantizable}
    type_file = work / "types.txt"
    type_file.write_text("".join(f"^{re.escape(n)}$={t.lower()}\n" for n, t in types.items()))
    quant_file = work / "quant.gguf"
    quantize = run(parsers.parse_quantize, "llama-quantize",
                   ["--imatrix", imatrix_file, "--tensor-type-file", type_file, tiny_model, quant_file, "Q4_K_M", THREADS],
                   "quantize.log")
    ppl_args = ["-f", wiki_text, "-c", CTX, "--chunks", CHUNKS, "-t", THREADS]
    ppl_f16 = run(parsers.parse_perplexity, "llama-perplexity", ["-m", tiny_model, *ppl_args], "ppl-f16.log")
    ppl_quant = run(parsers.parse_perplexity, "llama-perplexity", ["-m", quant_file, *ppl_args], "ppl-quant.log")
    base = work / "base.kld"
    ppl_saving_base = run(parsers.parse_perplexity, "llama-perplexity",
                          ["-m", tiny_model, *ppl_args, "--kl-divergence-base", base], "kld-base.log")
    kld_args = ["-c", CTX, "-t", THREADS, "--kl-divergence-base", base, "--kl-divergence"]
    kld_quant = run(parsers.parse_kl_divergence, "llama-perplexity", ["-m", quant_file, *kld_args], "kld-quant.log")
    kld_self = run(parsers.parse_kl_divergence, "llama-perplexity", ["-m", tiny_model, *kld_args], "kld-self.log")
    bench = run(parsers.parse_bench_json, "llama-bench",
                ["-m", f"{tiny_model},{quant_file}", "-p", 32, "-n", 8, "-r", 2, "-t", THREADS, "-o", "json"], "bench.log")
    return Runs(work, imatrix_file, imatrix, types, quant_file, quantize, ppl_f16, ppl_quant, ppl_saving_base,
                kld_quant, kld_self, bench)


def test_imatrix_run_and_file(runs, tiny_model):
    assert runs.imatrix.n_chunks == CHUNKS and runs.imatrix.n_ctx == CTX
    assert len(runs.imatrix.chunk_ppls) == CHUNKS
    assert runs.imatrix.ppl is not None and math.isfinite(runs.imatrix.ppl.value)
    reader = GGUFReader(runs.imatrix_file)
    sums = {t.name.removesuffix(".in_sum2"): t for t in reader.tensors if t.name.endswith(".in_sum2")}
    counts = {t.name.removesuffix(".counts"): t for t in reader.tensors if t.name.endswith(".counts")}
    # Every block weight gets importance data (token_embd is looked up, not multiplied: it gets none).
    inventory = ModelInventory.load(tiny_model)
    weights = {t.name for t in inventory.tensors if t.quantizable and t.role != "token_embd"}
    assert set(sums) == set(counts) == weights
    for name, tensor in sums.items():
        data = np.asarray(tensor.data, dtype=np.float32)
        assert data.size == inventory[name].row_length
        assert np.all(np.isfinite(data)) and np.all(data >= 0) and data.sum() > 0
        assert float(np.asarray(counts[name].data)[0]) > 0


def test_quantize_writes_the_types_of_the_type_file(runs, tiny_model):
    result = runs.quantize
    assert result.target == "Q4_K_M" and not result.dry_run
    assert result.imatrix_entries == 28
    written = ModelInventory.load(runs.quant_file)
    file_types = written.types()
    for name, wanted in runs.types.items():
        assert file_types[name] == wanted, name  # read back from the output file
        assert result.types()[name].upper() == wanted  # and what the tool said it wrote
    source = ModelInventory.load(tiny_model)
    for t in source.tensors:
        if not t.quantizable:
            assert file_types[t.name] == t.stored_type
    # The tool's 2-decimal summary agrees with the exact bpw of the file it wrote.
    assert result.quant_bpw == pytest.approx(written.bpw(), abs=0.006)
    assert result.model_bpw == pytest.approx(source.bpw(), abs=0.006)
    # Bytes predicted from the source model and the types alone are the bytes written.
    assert written.tensor_bytes() == source.tensor_bytes(runs.types)
    assert runs.quant_file.stat().st_size == written.file_bytes()


def test_perplexity_of_f16_and_quant(runs):
    f16, quant = runs.ppl_f16, runs.ppl_quant
    for r in (f16, quant):
        assert r.n_chunks == CHUNKS and r.n_ctx == CTX and len(r.chunk_ppls) == CHUNKS
        assert 1.0 < r.ppl.value < 4096 and 0 < r.ppl.error < r.ppl.value
    assert quant.ppl.value >= f16.ppl.value * 0.98  # quantizing may not make the model clearly better
    assert quant.ppl.value <= f16.ppl.value * 1.5  # ~5.7 bpw keeps it close
    assert runs.ppl_saving_base.ppl.value == pytest.approx(f16.ppl.value, abs=2e-4)


def test_kl_divergence_against_saved_logits(runs):
    kld, self_kld = runs.kld_quant, runs.kld_self
    assert kld.ppl_base.value == pytest.approx(runs.ppl_f16.ppl.value, rel=1e-5)
    assert kld.ppl_q.value == pytest.approx(runs.ppl_quant.ppl.value, rel=1e-5)
    assert kld.ppl_q.value >= kld.ppl_base.value * 0.99
    assert kld.kld.mean.value > 0 and kld.kld.minimum >= 0 and kld.kld.maximum >= kld.kld.percentile(99.0)
    assert kld.same_top_p_pct.value < 100.0
    # The model against its own logits: no divergence, the same top token everywhere.
    assert self_kld.kld.mean.value == pytest.approx(0.0, abs=1e-5)
    assert self_kld.same_top_p_pct.value == 100.0
    assert self_kld.ppl_ratio.value == pytest.approx(1.0, abs=1e-5)
    assert kld.kld.mean.value > 10 * max(self_kld.kld.mean.value, 1e-9)


def test_bench_json(runs, active_build, tiny_model):
    tests = runs.bench.tests
    assert [t.name for t in tests] == ["pp32", "tg8", "pp32", "tg8"]
    sizes = {ModelInventory.load(tiny_model).tensor_bytes(), ModelInventory.load(runs.quant_file).tensor_bytes()}
    assert {t.model_size for t in tests} == sizes
    assert {t.model_n_params for t in tests} == {ModelInventory.load(tiny_model).n_elements}
    for t in tests:
        assert t.build_number == active_build.build_number and t.build_commit == active_build.build_commit
        assert t.avg_ts > 0 and len(t.samples_ts) == 2 and t.n_threads == int(THREADS)
