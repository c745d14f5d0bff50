"""`tbpw calibrate` and `tbpw choose` on the tiny model with the real tools: the files they write, what
they print, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.measure.table import ErrorTable
from tbpw.model.inventory import ModelInventory

pytestmark = pytest.mark.tools


@pytest.fixture
def table_file(fork_error_table, tmp_path: Path) -> Path:
    path = tmp_path / "wmse.json"
    fork_error_table.write_json(path)
    return path


def test_calibrate_writes_a_table_rescaled_per_role(tiny_model, stock_imatrix, table_file, split_text, tmp_path,
                                                    monkeypatch):
    monkeypatch.setenv("TBPW_SENSITIVITY_CACHE", str(tmp_path / "cache"))
    cal, _ = split_text
    out = tmp_path / "calibrated.json"
    args = ["calibrate", str(tiny_model), "--imatrix", str(stock_imatrix), "--error-table", str(table_file),
            "-f", str(cal), "--ctx", "256", "--chunks", "2", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    measured, calibrated = ErrorTable.read_json(table_file), ErrorTable.read_json(out)
    assert [t.name for t in calibrated.tensors] == [t.name for t in measured.tensors]
    roles = {line.split(":")[0] for line in result.output.splitlines() if "KLD (scale" in line}
    assert {"attn_q", "attn_k", "attn_v", "ffn_down", "token_embd"} <= roles
    assert "groups (measured;" in result.output
    # every tensor of one role is scaled by the same factor at the same bpw
    ratios: dict[tuple[str, int], set[float]] = {}
    for t, m in zip(calibrated.tensors, measured.tensors):
        role = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.split(".")[0]
        for c, cm in zip(t.candidates, m.candidates):
            if cm.error > 0:
                ratios.setdefault((role, round(800 * c.bytes / t.n_elements)), set()).add(round(c.error / cm.error, 9))
    assert ratios and all(len(v) == 1 for v in ratios.values())
    again = CliRunner().invoke(main, args)  # the second time comes from the cache
    assert again.exit_code == 0 and "groups (cache;" in again.output
    assert ErrorTable.read_json(out).tensors == calibrated.tensors


def test_choose_writes_the_plan_with_the_lowest_calibration_kld(tiny_model, stock_imatrix, table_file, split_text,
                                                                 tmp_path):
    cal, _ = split_text
    out = tmp_path / "chosen.gguf"
    result = CliRunner().invoke(main, ["choose", str(tiny_model), "--imatrix", str(stock_imatrix), "--target-bpw", "4",
                                       "--error-table", f"fork={table_file}", "--allocator", "knapsack",
                                       "--allocator", "greedy", "-f", str(cal), "--ctx", "256", "--chunks", "2",
                                       "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # progress lines of slow tools go to stderr
    scores = report["calibration_kld"]
    assert set(scores) | set(report["duplicates"]) == {"knapsack-fork", "greedy-fork"}
    assert report["chosen"] == min(scores, key=scores.get)
    assert 3.995 <= ModelInventory.load(out).bpw() <= 4.0
    plan = json.loads(out.with_name("chosen.plan.json").read_text())
    assert plan["allocator"] == report["chosen"].rsplit("-", 1)[0]
    work = tmp_path / "chosen.choose"
    assert list(work.glob("*.kld.log")) and not list(work.glob("*.gguf")) and not list(work.glob("*.logits"))


@pytest.mark.parametrize("extra,words", [
    (["--error-table", "/nonexistent.json"], ["error table /nonexistent.json does not exist"]),
    (["--error-table", "{table}", "--allocator", "knapsak"], ["unknown allocator 'knapsak'", "did you mean 'knapsack'"]),
    (["--error-table", "{table}", "-O", "lagrangian.x=1"], ["--option lagrangian.x", "ALLOCATOR.KEY=VALUE"]),
    (["--error-table", "{table}", "--error-table", "{table}"], ["two error tables are named 'wmse'"]),
])
def test_choose_bad_input_is_one_line(tiny_model, stock_imatrix, table_file, split_text, tmp_path, extra, words):
    cal, _ = split_text
    out = tmp_path / "never.gguf"
    args = ["choose", str(tiny_model), "--imatrix", str(stock_imatrix), "--target-bpw", "4", "-f", str(cal),
            "--allocator", "knapsack", "-o", str(out), *[a.format(table=table_file) for a in extra]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error: ") and "\n" not in line
    for word in words:
        assert word in line
    assert not out.exists()


@pytest.mark.parametrize("command,model", [("choose", "ChooseOptions"), ("calibrate", "CalibrateOptions")])
def test_the_flags_default_to_the_options_a_recipe_gets(command, model):
    """One set of defaults: each flag that sets an options field shows and uses that field's default, so
    `tbpw choose` screens in rounds as a recipe's `choose: {}` does (--screen-chunks 2; 0 turns it off)."""
    import click

    from tbpw.select import options

    cls = getattr(options, model)
    cli = main.get_command(click.Context(main), command)
    assert cli is not None
    defaults = {p.name: p.default for p in cli.params}
    fields = {"choose": ["ctx", "chunks", "screen_chunks", "finalists", "margin", "refine_rounds", "refine_tries"],
              "calibrate": ["grouping", "ctx", "chunks", "background"]}[command]
    for field in fields:
        expected = cls.model_fields[field].get_default(call_default_factory=True)
        assert defaults[field] == (tuple(expected) if isinstance(expected, list) else expected), field
    if command == "calibrate":
        assert defaults["probes"] == tuple(cls().probes) and defaults["strength"] == cls().strengths[0]
    else:
        assert defaults["screen_chunks"] == 2


def test_a_flag_out_of_its_options_range_is_one_line(tiny_model, stock_imatrix, table_file, split_text, tmp_path):
    cal, _ = split_text
    result = CliRunner().invoke(main, ["choose", str(tiny_model), "--imatrix", str(stock_imatrix), "--target-bpw", "4",
                                       "--error-table", str(table_file), "-f", str(cal), "--screen-chunks", "1",
                                       "-o", str(tmp_path / "never.gguf")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: tbpw choose: ") and "screen_chunks is 0 (no screening) or at least 2" in result.output
