"""Live progress: the meters read the tools' real output (captured, and streaming from the real tools), a log
gets plain periodic lines with counts, a terminal gets a rich bar with elapsed time and ETA."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from tbpw.errors import TbpwError
from tbpw.llamacpp import progress
from tbpw.llamacpp.perplexity import base_logits
from tbpw.llamacpp.quantize import quantize
from tbpw.llamacpp.tools import run_tool

CAPTURED = Path(__file__).parent / "data" / "captured"


class Recorder(progress.Bar):
    def __init__(self) -> None:
        self.updates: list[tuple[int, int | None]] = []
        self.ended: bool | None = None

    def update(self, done: int, total: int | None) -> None:
        self.updates.append((done, total))

    def finish(self, ok: bool) -> None:
        self.ended = ok


def _read(meter: progress.Meter, name: str, piece: int, ok: bool = True) -> Recorder:
    """Feed a captured output to a tracker in pieces of `piece` characters, as a pipe may deliver it."""
    text = (CAPTURED / name).read_text(encoding="utf-8")
    bar = Recorder()
    tracker = progress.Tracker(meter, bar)
    for i in range(0, len(text), piece):
        tracker.feed("stdout", text[i:i + piece])
    tracker.ok = ok
    tracker.finish()
    return bar


@pytest.mark.parametrize(("meter", "name", "total"), [
    (progress.PERPLEXITY, "perplexity.txt", 8), (progress.PERPLEXITY, "kld-base.txt", 8),
    (progress.IMATRIX, "imatrix.txt", 8), (progress.COLLECTOR, "collector.txt", 8),
    (progress.KL_DIVERGENCE, "kld.txt", 8), (progress.HELLASWAG, "hellaswag.txt", 24),
    (progress.WINOGRANDE, "winogrande.txt", 110), (progress.WINOGRANDE, "winogrande-short.txt", 20),
    (progress.MULTIPLE_CHOICE, "multiple-choice.txt", 104), (progress.QUANTIZE, "quantize.txt", 38),
    (progress.BENCH, "bench-progress.txt", 3), (progress.BUILD, "build.txt", 149),
])
@pytest.mark.parametrize("piece", [7, 100_000])
def test_meters_count_the_units_in_real_tool_output(meter, name, total, piece):
    bar = _read(meter, name, piece, ok=False)  # ok=False: nothing is filled in at the end, all is read
    counted = [done for done, _ in bar.updates]
    assert counted == sorted(counted) and counted[0] >= 0
    last_total = bar.updates[-1][1]
    assert last_total == total
    # llama-bench marks a test when it starts: the last one is only known done when the tool exits well
    assert counted[-1] == (total - 1 if meter is progress.BENCH else total)
    assert bar.ended is False


def test_a_tool_that_ended_well_is_complete_and_a_failed_one_is_not():
    assert _read(progress.BENCH, "bench-progress.txt", 50).updates[-1] == (3, 3)
    assert _read(progress.BENCH, "bench-progress.txt", 50, ok=False).updates[-1] == (2, 3)


def test_the_expected_total_holds_until_the_tool_announces_its_own():
    bar = Recorder()
    tracker = progress.Tracker(progress.HELLASWAG.expecting(40), bar)
    assert tracker.total == 40
    tracker.feed("stderr", "hellaswag_score : loaded 24 tasks from prompt.\n")
    tracker.feed("stdout", "1\t100.00000000%\t[20.6549%, 100.0000%]\n")
    assert bar.updates == [(0, 24), (1, 24)]


def test_counts_line_says_done_total_percent_elapsed_and_eta():
    assert progress.counts_line("eval: llama-perplexity KL divergence", "chunks", 2, 8, 30.4) == \
        "eval: llama-perplexity KL divergence: 2/8 chunks (25%), 0:30 elapsed, ETA 1:31"
    assert progress.counts_line("x", "tasks", 5, None, 3725) == "x: 5 tasks, 1:02:05 elapsed"
    assert progress.counts_line("x", "tensors", 38, 38, 2) == "x: 38/38 tensors (100%), 0:02 elapsed"


def test_log_display_prints_a_line_per_interval_and_nothing_for_short_runs():
    out = io.StringIO()
    display = progress.LogDisplay(out, interval=3600)
    bar = display.begin("short", "chunks", 8)
    for i in range(1, 9):
        bar.update(i, 8)
    bar.finish(True)
    assert out.getvalue() == ""
    every = progress.LogDisplay(out, interval=0)
    bar = every.begin("long", "chunks", 4)
    for i in range(1, 5):
        bar.update(i, 4)
    bar.finish(True)
    lines = out.getvalue().splitlines()
    assert [re.search(r"(\d+)/4 chunks", line).group(1) for line in lines] == ["1", "2", "3", "4", "4"]
    assert lines[-1].endswith(", finished") and lines[0].startswith("  long: 1/4 chunks (25%), 0:00 elapsed, ETA")


def test_nothing_is_tracked_without_a_display_or_a_meter():
    with progress.track("llama-quantize", progress.QUANTIZE) as tracker:
        assert tracker is None
    with progress.showing(progress.LogDisplay(io.StringIO())), progress.track("llama-quantize", None) as tracker:
        assert tracker is None


def test_the_console_decides_between_a_bar_and_lines():
    assert isinstance(progress.for_console(Console(file=io.StringIO(), force_terminal=True)), progress.TerminalDisplay)
    assert isinstance(progress.for_console(Console(file=io.StringIO())), progress.LogDisplay)


@pytest.mark.tools
def test_a_real_run_on_a_log_prints_periodic_lines_with_counts(tiny_model, wiki_text, tmp_path):
    out = io.StringIO()
    with progress.showing(progress.LogDisplay(out, interval=0)), progress.stage("baseline"):
        result = base_logits(tiny_model, wiki_text, tmp_path / "base.logits", ctx=128, chunks=6, threads=2)
    assert result.ppl > 0
    lines = out.getvalue().splitlines()
    counts = [int(re.search(r": (\d+)/6 chunks \(", line).group(1)) for line in lines]
    assert all(line.startswith("  baseline: llama-perplexity perplexity: ") for line in lines)
    assert counts[:-1] == sorted(set(counts[:-1])) and counts[-1] == 6 and lines[-1].endswith(", finished")
    assert "elapsed" in lines[0]
    # the tool's own output and the log are what they were without a display
    log = (tmp_path / "base.logits.log").read_text()
    assert log.startswith("$ ") and "===== stdout =====" in log and "Final estimate: PPL" in log


@pytest.mark.tools
def test_a_real_run_on_a_terminal_draws_a_bar_with_elapsed_time_and_eta(tiny_model, stock_imatrix, tmp_path):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=140, color_system="standard")
    with progress.showing(progress.for_console(console)), progress.stage("stock-Q4_K_M"):
        quantize(tiny_model, tmp_path / "q.gguf", imatrix=stock_imatrix, base_type="Q4_K_M", threads=2)
    drawn = screen.getvalue()
    assert "\x1b[" in drawn  # a live display: cursor movements and colours
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert "stock-Q4_K_M: llama-quantize quantize" in plain and "tensors" in plain and "ETA" in plain
    assert re.search(r"\b\d+/38\b", plain) and re.search(r"0:00:0\d", plain)


@pytest.mark.tools
def test_a_failing_tool_still_fails_in_one_line_with_its_log(tmp_path):
    out = io.StringIO()
    with progress.showing(progress.LogDisplay(out, interval=0)), pytest.raises(TbpwError) as caught:
        run_tool("llama-perplexity", ["-m", str(tmp_path / "missing.gguf"), "-f", str(tmp_path / "t.txt")],
                 log_path=tmp_path / "fail.log", meter=progress.PERPLEXITY)
    assert "llama-perplexity failed" in str(caught.value) and str(tmp_path / "fail.log") in str(caught.value)
    assert "\n" not in str(caught.value) and caught.value.details
    assert (tmp_path / "fail.log").read_text().rstrip().endswith("=====")
