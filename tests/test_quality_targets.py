"""benchmarks/quality.py's verdict on the chosen plan: KLD against min(stock, fork) per level, the geometric
mean, the shortfall under each target (pure arithmetic over rows)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _row(quality, level: str, variant: str, kld: float, bpw: float = 4.0):
    return quality.Row(level, variant, bpw, {"kld_mean": kld, "kld_p99": kld * 5, "same_top_p": 95.0}, 1.0)


def test_ratios_are_against_the_better_of_stock_and_fork(quality):
    run = quality.Result("m", "", targets={"A": 4.0, "B": 5.0})
    run.rows = [_row(quality, "A", "stock", 0.010), _row(quality, "A", "fork --target-bpw", 0.008),
                _row(quality, "A", "quant-like-A-knapsack", 0.005),
                _row(quality, "A", "quant-like-A-choose", 0.004, bpw=3.997),
                _row(quality, "B", "stock", 0.002, 5.0), _row(quality, "B", "fork --target-bpw", 0.004, 5.0),
                _row(quality, "B", "quant-like-B-knapsack", 0.0019, 4.9995),
                _row(quality, "B", "quant-like-B-choose", 0.0018, 4.9995)]
    text = "\n".join(quality.target_summary(run))
    assert "KLD / min(stock, fork) <= 0.85" in text
    assert "| KLD / min(stock, fork) | 0.500 | 0.900 | 0.671 |" in text  # the chosen plans: 0.004/0.008, 0.0018/0.002
    assert "| shortfall (bpw) | 0.0030 | 0.0005 | |" in text
    assert "every level: missed at B (worst 0.900 at B)" in text and "geometric mean: 0.671, met" in text


def test_without_fork_rows_the_stock_targets_apply(quality):
    run = quality.Result("m", "", targets={"A": 4.0})
    run.rows = [_row(quality, "A", "stock", 0.010), _row(quality, "A", "quant-like-A-choose", 0.005)]
    text = "\n".join(quality.target_summary(run))
    assert "KLD / stock <= 0.6" in text and "mean <= 0.45" in text
    assert "every level: met (worst 0.500 at A)" in text and "geometric mean: 0.500, missed" in text
    assert quality.target_summary(quality.Result("m", "")) == []


def test_a_level_name_leaves_the_variant_family(quality):
    assert quality.family(_row(quality, "Q3_K_M", "quant-like-Q3_K_M-choose", 0.1)) == "quant-<level>-choose"
    assert quality.family(_row(quality, "IQ3_XXS", "quant-like-IQ3_XXS-knapsack", 0.1)) == "quant-<level>-knapsack"
    assert quality.family(_row(quality, "Q2_K", "fork --target-bpw", 0.1)) == "fork --target-bpw"


def test_the_printed_command_names_no_folder_of_this_machine(quality):
    argv = ["--model", "bench-odd", "--fork-build", "/work/fork/builds/abc/", "--work", "/tmp/w", "--json=/tmp/r.json",
            "--out", "/tmp/q.md", "--set", "choose.chunks=16"]
    assert quality.public_argv(argv) == ["--model", "bench-odd", "--fork-build", "FORK_BUILD_DIR", "--set",
                                         "choose.chunks=16"]


def test_a_bench_model_is_printed_where_tbpw_keeps_it(quality):
    model = Path("/root/.cache/tbpw/bench-model/2c8b21b42430c6ca/bench-f16.gguf")
    assert quality.public_model("bench", model) == "$TBPW_HOME/bench-model/2c8b21b42430c6ca/bench-f16.gguf"
    assert quality.public_model("/models/other-f16.gguf", Path("/models/other-f16.gguf")) == "other-f16.gguf"
