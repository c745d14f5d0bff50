"""The output parsers, on text captured from the real tools (tests/data/capture.py regenerates it).

Expected values come from the capture manifest (what was asked of the tool), from the tiny model itself,
or from relations the numbers must satisfy; none is copied from the captured text.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from tbpw.llamacpp import parsers
from tbpw.llamacpp.features import (
    parse_devices,
    parse_help_options,
    parse_quantize_types,
)
from tbpw.llamacpp.parsers import ParseError
from tbpw.llamacpp.tools import ToolRun
from tbpw.model.inventory import ModelInventory

CAPTURED = Path(__file__).parent / "data" / "captured"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((CAPTURED / "manifest.json").read_text())


def captured(name: str) -> str:
    return (CAPTURED / name).read_text(encoding="utf-8")


def block_lines(text: str, title: str) -> list[str]:
    """The non-empty lines under `====== title ======`, found without the parser's regexes."""
    lines = text.splitlines()
    start = lines.index(f"====== {title} ======") + 1
    out = []
    for line in lines[start:]:
        if not line.strip():
            break
        out.append(line)
    return out


# ---------------------------------------------------------------- perplexity


def test_perplexity_final_estimate_and_chunks(manifest):
    result = parsers.parse_perplexity(captured("perplexity.txt"))
    assert result.n_chunks == manifest["chunks"]
    assert result.n_ctx == manifest["ctx"]
    assert len(result.chunk_ppls) == manifest["chunks"]
    # The final estimate is the running estimate after the last chunk (both printed with 4 decimals).
    assert result.ppl.value == pytest.approx(result.chunk_ppls[-1], abs=1e-4)
    assert 1.0 < result.ppl.value < 4096  # a trained model beats the uniform guess over its 4096 tokens
    assert 0 < result.ppl.error < result.ppl.value


def test_saving_kld_base_logits_computes_the_same_perplexity():
    plain = parsers.parse_perplexity(captured("perplexity.txt"))
    saving = parsers.parse_perplexity(captured("kld-base.txt"))
    # Same model, text and contexts; threads may sum in another order, so allow the last printed digit.
    assert saving.ppl.value == pytest.approx(plain.ppl.value, abs=2e-4)
    assert saving.chunk_ppls == pytest.approx(plain.chunk_ppls, abs=2e-4)


def test_perplexity_without_final_line_is_a_parse_error():
    with pytest.raises(ParseError, match="Final estimate"):
        parsers.parse_perplexity(captured("perplexity-missing-model.txt"))


def test_parse_run_names_the_log(tmp_path):
    run = ToolRun("llama-perplexity", (), 1, "", captured("perplexity-missing-model.txt"), tmp_path / "ppl.log", 0.1)
    with pytest.raises(ParseError, match=str(tmp_path / "ppl.log")):
        parsers.parse_run(parsers.parse_perplexity, run)
    ok = ToolRun("llama-perplexity", (), 0, "", captured("perplexity.txt"), tmp_path / "ok.log", 0.1)
    assert parsers.parse_run(parsers.parse_perplexity, ok) == parsers.parse_perplexity(captured("perplexity.txt"))


# ---------------------------------------------------------------- KL divergence


@pytest.fixture(scope="module")
def kld() -> parsers.KldResult:
    return parsers.parse_kl_divergence(captured("kld.txt"))


def test_kld_reads_every_line_of_the_three_blocks(kld):
    text = captured("kld.txt")
    assert len(block_lines(text, "Perplexity statistics")) == 6
    kld_lines = block_lines(text, "KL divergence statistics")
    assert len(kld_lines) == 4 + len(kld.kld.percentiles)  # mean, maximum, median, minimum + percentiles
    prob_lines = block_lines(text, "Token probability statistics")
    assert len(prob_lines) == 6 + len(kld.delta_p_pct.percentiles)  # + RMS and Same top p
    assert set(kld.kld.percentiles) == {99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1}
    assert set(kld.delta_p_pct.percentiles) == {99.9, 99.0, 95.0, 90.0, 75.0, 25.0, 10.0, 5.0, 1.0, 0.1}
    # Each value equals the number at the end of its own line.
    for line in kld_lines[1:]:
        label, value = line.split(":")
        p = label.split("%")[0].strip()
        expected = float(value)
        if label.startswith("Maximum"):
            assert kld.kld.maximum == expected
        elif label.startswith("Median"):
            assert kld.kld.median == expected
        elif label.startswith("Minimum"):
            assert kld.kld.minimum == expected
        else:
            assert kld.kld.percentile(float(p)) == expected


def test_kld_relations_between_the_numbers(kld):
    base = parsers.parse_perplexity(captured("kld-base.txt"))
    assert kld.ppl_base.value == pytest.approx(base.ppl.value, abs=1e-3)  # same logits, more decimals
    assert kld.ppl_ratio.value == pytest.approx(math.exp(kld.ln_ppl_ratio.value), rel=2e-6)
    assert kld.ppl_difference.value == pytest.approx(kld.ppl_q.value - kld.ppl_base.value, abs=2e-6)
    assert 0 < kld.ln_ppl_correlation_pct <= 100.0
    dist = kld.kld
    ladder = [dist.maximum, *dist.percentiles.values(), dist.minimum]  # percentiles come highest first
    assert ladder == sorted(ladder, reverse=True)
    assert dist.minimum >= 0 and dist.percentile(90.0) >= dist.median >= dist.percentile(10.0)
    assert dist.minimum <= dist.mean.value <= dist.maximum and dist.mean.error > 0
    dp = kld.delta_p_pct
    assert [dp.maximum, *dp.percentiles.values(), dp.minimum] == sorted([dp.maximum, *dp.percentiles.values(), dp.minimum], reverse=True)
    assert kld.rms_delta_p_pct.value >= abs(dp.mean.value)
    assert 0 <= kld.same_top_p_pct.value <= 100


def test_kld_flatten_gives_report_numbers(kld):
    flat = parsers.flatten(kld)
    assert flat["kld_mean"] == kld.kld.mean.value and flat["kld_mean_error"] == kld.kld.mean.error
    assert flat["kld_p99.9"] == kld.kld.percentile(99.9)
    assert flat["same_top_p_pct"] == kld.same_top_p_pct.value
    assert flat["delta_p_pct_p0.1"] == kld.delta_p_pct.percentile(0.1)
    assert all(isinstance(v, float) for v in flat.values())


def test_kld_blocks_missing_is_a_parse_error():
    text = captured("kld.txt")
    cut = text[: text.index("====== KL divergence statistics")]
    with pytest.raises(ParseError, match="KL divergence statistics"):
        parsers.parse_kl_divergence(cut)


# ---------------------------------------------------------------- tasks


def _is_fraction_of(pct: float, n: int, decimals: int) -> bool:
    correct = pct * n / 100.0
    return abs(correct - round(correct)) <= n * 10 ** -decimals


def test_hellaswag_last_row(manifest):
    result = parsers.parse_hellaswag(captured("hellaswag.txt"))
    assert result.tasks == manifest["runs"]["hellaswag"]["tasks"]
    assert result.ci_low_pct <= result.acc_norm_pct <= result.ci_high_pct
    assert _is_fraction_of(result.acc_norm_pct, result.tasks, 6)  # acc_norm is correct tasks / tasks


def test_winogrande_final_line(manifest):
    result = parsers.parse_winogrande(captured("winogrande.txt"))
    n = manifest["runs"]["winogrande"]["tasks"]
    assert result.final and result.tasks == n
    assert _is_fraction_of(result.accuracy_pct, n, 3)
    p = result.accuracy_pct / 100
    assert result.error_pct == pytest.approx(100 * math.sqrt(p * (1 - p) / (n - 1)), abs=1e-3)


def test_winogrande_under_100_tasks_reads_the_last_row(manifest):
    result = parsers.parse_winogrande(captured("winogrande-short.txt"))
    assert not result.final and result.error_pct is None
    assert result.tasks == manifest["runs"]["winogrande-short"]["tasks"]
    assert _is_fraction_of(result.accuracy_pct, result.tasks, 3)


def test_multiple_choice_final_and_random_chance(manifest):
    result = parsers.parse_multiple_choice(captured("multiple-choice.txt"))
    n = manifest["runs"]["multiple-choice"]["tasks"]
    assert result.final and result.tasks == n
    assert _is_fraction_of(result.accuracy_pct, n, 3)
    assert result.random_chance is not None
    assert result.random_chance.value == pytest.approx(25.0)  # capture.py gives every task 4 answers


def test_task_parsers_reject_other_output():
    for parse in (parsers.parse_hellaswag, parsers.parse_winogrande, parsers.parse_multiple_choice):
        with pytest.raises(ParseError):
            parse(captured("perplexity.txt"))


# ---------------------------------------------------------------- llama-bench


@pytest.mark.parametrize("name", ["bench.json", "bench-jsonl.txt"])
def test_bench_json(name, manifest, tiny_model):
    run = manifest["runs"][name.split(".")[0]]
    result = parsers.parse_bench_json(captured(name))
    assert [t.name for t in result.tests] == run["tests"]
    inventory = ModelInventory.load(tiny_model)
    for test in result.tests:
        assert test.build_number == manifest["build_number"] and test.build_commit == manifest["build_commit"]
        assert test.model_n_params == inventory.n_elements
        assert test.model_size == inventory.tensor_bytes()
        assert test.n_threads == manifest["threads"]
        assert len(test.samples_ts) == run["repetitions"]
        assert test.avg_ts == pytest.approx(sum(test.samples_ts) / len(test.samples_ts), rel=1e-3)
        assert test.avg_ts > 0 and test.stddev_ts >= 0
    assert result.get(run["tests"][0]) is result.tests[0]
    with pytest.raises(KeyError, match="pp"):
        result.get("tg999")


def test_bench_without_json_is_a_parse_error():
    with pytest.raises(ParseError, match="-o json"):
        parsers.parse_bench_json(captured("version.txt"))


# ---------------------------------------------------------------- llama-quantize


@pytest.mark.parametrize("name", ["quantize", "quantize-dry-run"])
def test_quantize_summary_and_tensor_types(name, manifest, tiny_model):
    run = manifest["runs"][name]
    result = parsers.parse_quantize(captured(f"{name}.txt"))
    inventory = ModelInventory.load(tiny_model)
    assert result.dry_run == (name == "quantize-dry-run")
    assert sorted(t.name for t in result.tensors) == sorted(t.name for t in inventory.tensors)
    assert [t.index for t in result.tensors] == list(range(1, len(inventory.tensors) + 1))
    written = result.types()
    by_name = {t.name: t for t in result.tensors}
    for tensor in inventory.tensors:
        parsed = by_name[tensor.name]
        assert parsed.shape == tensor.shape
        assert parsed.source_type.upper() == tensor.stored_type
        expected = run["types"].get(tensor.name, tensor.stored_type)
        assert written[tensor.name].upper() == expected.upper()
    assert result.target == run["base"]
    assert result.model_bpw == pytest.approx(inventory.bpw(), abs=0.005)
    quant_types = {n: t.upper() for n, t in written.items()}
    assert result.quant_bpw == pytest.approx(inventory.bpw(quant_types), abs=0.005)
    assert result.quant_size_mib == pytest.approx(inventory.tensor_bytes(quant_types) / 2**20, abs=0.005)
    assert sum(t.new_size_mib for t in result.tensors) == pytest.approx(result.quant_size_mib, abs=0.005 * len(result.tensors))
    # Overrides are printed only where the file's type differs from what the mixture rules picked.
    assert result.overrides and all(run["types"][n].upper() == t.upper() for n, t in result.overrides.items())


def test_quantize_reads_the_imatrix_entry_count():
    real = parsers.parse_quantize(captured("quantize.txt"))
    dry = parsers.parse_quantize(captured("quantize-dry-run.txt"))
    assert real.imatrix_entries == 28  # the tiny llama has 4 layers x 7 block weights
    assert dry.imatrix_entries is None
    assert real.quantize_ms is not None and real.quantize_ms > 0


def test_quantize_parses_the_forks_output(fork_tiny_dir):
    plans = json.loads((fork_tiny_dir / "fork-plans.json").read_text())
    for target, plan in plans.items():
        result = parsers.parse_quantize((fork_tiny_dir / "logs" / f"q-{target}.log").read_text(encoding="utf-8"))
        types = ast.literal_eval(plan["types"]) if isinstance(plan["types"], str) else plan["types"]
        assert {n: t.upper() for n, t in result.types().items()} == types
        assert result.quant_bpw == pytest.approx(float(plan["achieved_bpw"]), abs=5e-5)


def test_quantize_without_summary_is_a_parse_error():
    text = captured("quantize.txt")
    with pytest.raises(ParseError, match="quant size"):
        parsers.parse_quantize(text[: text.index("llama_model_quantize_impl: model size")])


# ---------------------------------------------------------------- llama-imatrix


def test_imatrix_summary(manifest):
    result = parsers.parse_imatrix(captured("imatrix.txt"))
    assert result.n_chunks == manifest["chunks"] and result.n_ctx == manifest["ctx"]
    assert len(result.chunk_ppls) == manifest["chunks"]
    # imatrix scores the text as llama-perplexity does: same contexts, same perplexity.
    assert result.ppl.value == pytest.approx(parsers.parse_perplexity(captured("perplexity.txt")).ppl.value, abs=2e-4)
    assert result.partial == {} and result.skipped == ()


def test_imatrix_without_work_is_a_parse_error():
    with pytest.raises(ParseError, match="computing over"):
        parsers.parse_imatrix(captured("version.txt"))


# ---------------------------------------------------------------- version and help


def test_version_of_the_build(manifest):
    info = parsers.parse_version(captured("version.txt"))
    assert info.build_number == manifest["build_number"]
    assert info.commit == manifest["build_commit"]
    assert info.compiler and info.target and " " not in info.version


def test_version_of_the_fork_log(fork_tiny_dir):
    info = parsers.parse_version((fork_tiny_dir / "logs" / "q-4.0.log").read_text(encoding="utf-8"))
    assert (info.build_number, info.commit) == (0, "unknown")  # the fixture's fork was built without them


def test_quantize_help_options_and_types():
    text = captured("quantize-help.txt")
    options = parse_help_options(text)
    for flag in ("--tensor-type-file", "--tensor-type", "--dry-run", "--imatrix", "--pure"):
        assert flag in options
    assert "--target-bpw" not in options and "--state-file" not in options
    types = parse_quantize_types(text)
    assert len(types) == len(set(types))
    assert {"Q4_K_M", "IQ4_XS", "Q8_0", "F16", "COPY"} <= set(types)


def test_devices_of_a_cpu_build():
    text = captured("devices.txt")
    assert "Available devices:" in text
    assert parse_devices(text) == []  # CPU is not listed: only accelerators are
    assert parse_devices(captured("version.txt")) == []


def test_bench_rows_are_what_llama_bench_prints_in_its_own_table(manifest):
    """One run printed both formats (`-o md -oe json`): the rows tbpw writes from the JSON are its Markdown rows."""
    from tbpw.llamacpp.bench import markdown_rows

    text = captured("bench-md.txt")
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    printed = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in table[2:]]
    rows = markdown_rows(parsers.parse_bench_json(text))
    assert [list(r) for r in rows] == [header] * len(printed) and rows == printed
    assert [r["test"] for r in rows] == manifest["runs"]["bench-md"]["tests"]


def test_task_standard_errors_are_the_tools_own_formula():
    """HellaSwag prints no ±: tbpw computes the one llama-perplexity prints for WinoGrande and multiple choice."""
    from tbpw_plugins.evaluators.tasks import standard_error

    for name in ("winogrande.txt", "multiple-choice.txt"):
        score = (parsers.parse_winogrande if "wino" in name else parsers.parse_multiple_choice)(captured(name))
        assert score.final and score.error_pct is not None
        assert standard_error(score.accuracy_pct, score.tasks) == pytest.approx(score.error_pct, abs=6e-5)
    assert math.isnan(standard_error(50.0, 1))
