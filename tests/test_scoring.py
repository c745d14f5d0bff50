"""Scoring plans on calibration text with less work: per-chunk KLD from llama-perplexity's output, the screening
tie rule, windows of the float logits and scores joined across them, kept scores (an identical plan is scored
once), and select_plan's rounds (each chunk scored once per plan)."""

from __future__ import annotations

import math

import pytest
from instances import allocator
from test_parsers import captured

from tbpw.allocate.service import Planner
from tbpw.llamacpp import parsers, perplexity
from tbpw.llamacpp.perplexity import KldScore, base_logits, base_window, kld
from tbpw.llamacpp.quantize import quantize
from tbpw.model.budget import Target
from tbpw.quantize.store import TensorStore
from tbpw.select.choose import PlanCandidate, select_plan
from tbpw.select.options import ChooseOptions
from tbpw.select.scoring import Scorer, finalists, tied_with_leader


def _score(chunks: list[float]) -> KldScore:
    mean = round(sum(chunks) / len(chunks), 6)
    return KldScore(mean, 0.0, 0.0, 0.0, 0.0, 0.0, tuple(chunks))


def test_per_chunk_kld_adds_up_to_the_printed_mean():
    text = captured("kld.txt")
    chunks = parsers.parse_kld_chunks(text)
    assert len(chunks) == 8
    mean = parsers.parse_kl_divergence(text).kld.mean.value
    assert sum(chunks) / len(chunks) == pytest.approx(mean, abs=1e-5)
    assert all(c > 0 for c in chunks)


def test_a_run_cut_short_has_no_chunk_rows():
    with pytest.raises(parsers.ParseError, match="no numbered chunk rows"):
        parsers.parse_kld_chunks(captured("perplexity-missing-model.txt"))


def test_a_plan_worse_on_every_chunk_is_not_tied_and_a_noisy_one_is():
    leader = _score([0.0010, 0.0012, 0.0009, 0.0011])
    worse = _score([0.0015, 0.0017, 0.0013, 0.0016])  # 0.0005 worse on every chunk
    noisy = _score([0.0009, 0.0016, 0.0008, 0.0012])  # better on two chunks, worse on two
    assert not tied_with_leader(leader, worse)
    assert tied_with_leader(leader, noisy)
    assert tied_with_leader(leader, KldScore(0.5, 0, 0, 0, 0, 0))  # no per-chunk values: kept, to be safe
    order = ["a", "b", "c"]
    assert finalists({"a": worse, "b": leader, "c": noisy}, order, limit=3) == ["b", "c"]
    assert finalists({"a": worse, "b": leader, "c": noisy}, order, limit=1) == ["b"]


def test_a_margin_drops_a_plan_that_cannot_beat_the_leader_by_more_than_it():
    leader = _score([0.0010, 0.0012, 0.0009, 0.0011])
    close = _score([0.00101, 0.00120, 0.00091, 0.00110])  # within 1% of the leader on every chunk
    noisy = _score([0.0009, 0.0016, 0.0008, 0.0012])  # may still be 10% better: the chunks cannot tell
    assert tied_with_leader(leader, close)  # it may be better by a hair...
    assert not tied_with_leader(leader, close, margin=0.02)  # ...but not by 2%: not worth more chunks
    assert tied_with_leader(leader, noisy, margin=0.02)
    assert tied_with_leader(leader, KldScore(0.5, 0, 0, 0, 0, 0), margin=0.02)  # no per-chunk values: kept
    order = ["leader", "close", "noisy"]
    scores = {"leader": leader, "close": close, "noisy": noisy}
    assert finalists(scores, order, limit=3) == ["leader", "close", "noisy"]
    assert finalists(scores, order, limit=3, margin=0.02) == ["leader", "noisy"]


def test_joined_scores_weigh_each_window_by_its_chunks():
    first = KldScore(0.002, 0.010, 90.0, 99.0, 10.0, 1.0, (0.001, 0.003))
    second = KldScore(0.005, 0.020, 80.0, 98.0, 20.0, 2.0, (0.005,))
    both = KldScore.joined([first, second])
    assert both.kld_mean == pytest.approx((2 * 0.002 + 0.005) / 3)
    assert both.same_top_p == pytest.approx((2 * 90.0 + 80.0) / 3)
    assert both.ppl == pytest.approx(math.exp((2 * math.log(10.0) + math.log(20.0)) / 3))
    assert both.kld_p99 == 0.020 and both.seconds == 3.0 and both.chunk_kld == (0.001, 0.003, 0.005)
    with pytest.raises(Exception, match="per-chunk KLD"):
        KldScore.joined([first, KldScore(0.005, 0.020, 80.0, 98.0, 20.0, 2.0)])


@pytest.mark.tools
def test_a_window_of_the_logits_scores_its_chunks_as_the_whole_file_does(tiny_model, stock_imatrix, split_text,
                                                                          tmp_path):
    cal, _ = split_text
    full = base_logits(tiny_model, cal, tmp_path / "base.logits", ctx=128, chunks=4, threads=2)
    quant = tmp_path / "q4.gguf"
    quantize(tiny_model, quant, imatrix=stock_imatrix, base_type="Q4_K_M", threads=2, log_path=tmp_path / "q.log")
    on_four = kld(quant, full, threads=2)
    first = base_window(full, 0, 2, tmp_path / "base-0-2.logits")
    last = base_window(full, 2, 4, tmp_path / "base-2-4.logits")
    assert first.chunks == last.chunks == 2
    assert first.path.stat().st_size == last.path.stat().st_size < full.path.stat().st_size
    on_first, on_last = kld(quant, first, threads=2), kld(quant, last, threads=2)
    assert len(on_four.chunk_kld) == 4 and len(on_first.chunk_kld) == len(on_last.chunk_kld) == 2
    # the same tokens and the same float logits: each chunk scores as it does in the whole run
    assert on_first.kld_mean == pytest.approx(sum(on_four.chunk_kld[:2]) / 2, abs=2e-5)
    assert on_last.kld_mean == pytest.approx(sum(on_four.chunk_kld[2:]) / 2, abs=4e-5)
    assert KldScore.joined([on_first, on_last]).kld_mean == pytest.approx(on_four.kld_mean, abs=2e-6)
    assert base_window(full, 0, 4, tmp_path / "unused.logits") is full
    with pytest.raises(Exception, match="holds 4 chunks"):
        base_window(full, 2, 5, tmp_path / "past-the-end.logits")


@pytest.mark.tools
def test_the_float_model_scores_zero_against_its_own_logits(tiny_model, split_text, tmp_path):
    """Why calibration runs no floor probe with a float background (tbpw.select.calibrate)."""
    cal, _ = split_text
    base = base_logits(tiny_model, cal, tmp_path / "base.logits", ctx=128, chunks=2, threads=2)
    assert abs(kld(tiny_model, base, threads=2).kld_mean) < 1e-6


@pytest.mark.tools
def test_an_identical_plan_is_scored_once_and_screening_scores_fewer(tiny_model, stock_imatrix, fork_error_table,
                                                                      split_text, tmp_path, monkeypatch):
    cal, _ = split_text
    planner = Planner(tiny_model, stock_imatrix, threads=2, store=TensorStore(tmp_path / "store"))
    target = Target.parse(bpw=4.5)
    problem = planner.problem(fork_error_table, target)
    candidates = [PlanCandidate(name, planner.plan(fork_error_table, target, allocator(name), problem=problem))
                  for name in ("knapsack", "greedy", "lagrangian")]
    distinct = len({str(sorted(c.plan.types().items())) for c in candidates})
    assert distinct >= 2
    scorer = Scorer(tiny_model, cal, imatrix=stock_imatrix, ctx=128, chunks=4, threads=2, cache_dir=tmp_path / "scores")

    sel = select_plan(candidates, planner, cal, tmp_path / "a",
                      ChooseOptions(ctx=128, chunks=4, screen_chunks=2, finalists=1, margin=0.0), scorer=scorer)
    assert len(sel.screening) == distinct and sel.scores == sel.screening and sel.chunks == 2
    assert sel.best == min(sel.screening, key=lambda n: sel.screening[n].kld_mean)
    assert sel.runs == distinct  # a lone finalist is not scored again
    assert sel.path.is_file()

    wide = select_plan(candidates, planner, cal, tmp_path / "w",
                       ChooseOptions(ctx=128, chunks=4, screen_chunks=2, finalists=3, margin=0.0), scorer=scorer)
    tied = [n for n in wide.screening if tied_with_leader(wide.screening[sel.best], wide.screening[n])]
    if len(tied) > 1:  # the finalists are the tied plans, each scored on the 2 chunks it had not been scored on
        assert set(wide.scores) == set(tied) and wide.chunks == 4 and wide.runs == len(tied)
        for name in tied:
            types = next(c.plan.types() for c in candidates if c.name == name)
            assert scorer.lookup(types, 4, start=2) is not None and scorer.lookup(types, 4) is None
            parts = [scorer.lookup(types, 2), scorer.lookup(types, 4, start=2)]
            assert wide.scores[name].kld_mean == pytest.approx(KldScore.joined(parts).kld_mean)
    else:
        assert wide.runs == 0 and wide.best == sel.best
    # a margin nearly the leader's whole KLD: no plan may beat it by that much, so none goes on
    strict = select_plan(candidates, planner, cal, tmp_path / "m",
                         ChooseOptions(ctx=128, chunks=4, screen_chunks=2, finalists=3, margin=0.99), scorer=scorer)
    going_on = finalists(strict.screening, list(strict.screening), 3, margin=0.99)
    assert going_on == [sel.best] and strict.best == sel.best and strict.chunks == 2 and strict.runs == 0
    assert scorer.base_runs == 1  # one set of float logits serves 2 and 4 chunks

    def no_tools(*args, **kwargs):
        raise AssertionError("a kept score ran a tool")

    monkeypatch.setattr(perplexity, "run_tool", no_tools)
    again = select_plan(candidates, planner, cal, tmp_path / "b",
                        ChooseOptions(ctx=128, chunks=4, screen_chunks=2, finalists=1, margin=0.0),
                        scorer=Scorer(tiny_model, cal, imatrix=stock_imatrix, ctx=128, chunks=4, threads=2,
                                      cache_dir=tmp_path / "scores"))
    assert again.runs == 0 and again.best == sel.best
