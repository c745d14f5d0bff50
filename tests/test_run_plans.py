"""`tbpw run` plans through the same service as `tbpw quantize`: size targets pay for the written file's
metadata, and an allocator that cannot run with this build says so before any stage starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.model.budget import parse_size
from tbpw.model.inventory import ModelInventory
from tbpw.run import recipe as recipes

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"

pytestmark = pytest.mark.tools


def _args(tiny_model: Path, wiki_text: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}", *extra]
    return ["run", str(RECIPE), *[a for s in sets for a in ("--set", s)]]


@pytest.mark.slow
def test_a_size_target_lands_within_the_budget_of_the_written_file(tmp_path, tiny_model, wiki_text):
    out = tmp_path / "tiny"
    size = "2.75m"
    result = CliRunner().invoke(main, _args(tiny_model, wiki_text, out, f"targets=[{{size: {size}}}]",
                                            "compare_stock=[]", "bench.enabled=false"))
    assert result.exit_code == 0, result.output
    written = out / "quant-2.75m-knapsack" / "model.gguf"
    plan = json.loads((out / "quant-2.75m-knapsack" / "model.plan.json").read_text())
    budget = parse_size(size)
    assert written.stat().st_size == plan["file_bytes"] <= budget
    # the metadata the plan paid for is the written file's own (the imatrix keys included), not the input's
    assert plan["metadata_bytes"] == ModelInventory.load(written).metadata_bytes
    assert plan["metadata_bytes"] > ModelInventory.load(tiny_model).metadata_bytes
    assert budget - written.stat().st_size < 0.01 * budget


def test_fork_native_validates_and_fails_before_any_work_on_a_stock_build(tmp_path, tiny_model, wiki_text,
                                                                          active_build):
    out = tmp_path / "tiny"
    args = _args(tiny_model, wiki_text, out, "allocators=[{name: fork-native}]")
    overrides = [a for a in args[2:] if a != "--set"]
    loaded = recipes.load(RECIPE, overrides)  # a known plugin with valid options: the recipe itself is fine
    assert loaded.allocators is not None and loaded.allocators[0].name == "fork-native"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "has no --target-bpw" in lines[0] and "fork-native" in lines[0]
    assert not out.exists() or not any(out.iterdir()), "no stage ran"
