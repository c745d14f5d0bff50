"""The built-in error metrics: what each one measures, on small hand-checked arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tbpw.errors import TbpwError
from tbpw.measure.slices import ColumnStats, MeasureSetup, MetricContext, TensorSample
from tbpw_plugins.metrics import fork_factors
from tbpw_plugins.metrics.rows import clip_rows, trimmed_mean, winsorize


def ctx(tensor="blk.0.ffn_up.weight", bpw=4.5, rows=10, type_name="Q4_K"):
    return MetricContext(tensor=tensor, role=tensor.split(".")[2] if tensor.startswith("blk") else tensor,
                         type=type_name, nominal_bpw=bpw, slice_rows=rows)


def metric(plugin_manager, name, **options):
    return plugin_manager.metrics().create(name, options)


X = np.array([[1.0, 2.0, 0.0, -1.0], [0.5, -0.5, 1.0, 2.0]], dtype=np.float32)
Y = np.array([[1.1, 2.0, 0.0, -1.0], [0.5, -0.5, 0.8, 2.0]], dtype=np.float32)
SQ = np.array([4.0, 1.0, 1.0, 0.0], dtype=np.float32)
MEAN = np.array([1.0, 0.0, -0.5, 0.0], dtype=np.float32)


def test_mse_is_the_mean_relative_row_error_times_rows(plugin_manager):
    m = metric(plugin_manager, "mse")
    expected = (0.01 / 6.0 + 0.04 / 5.5) / 2 * 10
    assert m.slice_error(X, Y, ColumnStats(SQ, MEAN), ctx()) == pytest.approx(expected, rel=1e-6)


def test_wmse_weights_columns_by_second_moment(plugin_manager):
    m = metric(plugin_manager, "wmse")
    # row 1: 4 * 0.01 / (4 + 4 + 0 + 0); row 2: 1 * 0.04 / (1 + 0.25 + 1 + 0)
    expected = (0.04 / 8.0 + 0.04 / 2.25) / 2 * 10
    assert m.slice_error(X, Y, ColumnStats(SQ), ctx()) == pytest.approx(expected, rel=1e-6)
    # a column with zero importance does not count at all
    y2 = Y.copy()
    y2[:, 3] += 5.0
    assert m.slice_error(X, y2, ColumnStats(SQ), ctx()) == pytest.approx(expected, rel=1e-6)
    # without imatrix data it is the plain relative error
    assert m.slice_error(X, Y, ColumnStats(), ctx()) == pytest.approx(metric(plugin_manager, "mse").slice_error(X, Y, ColumnStats(), ctx()))


def test_fork_energy_form_and_the_consistent_fix(plugin_manager):
    fork = metric(plugin_manager, "fork", winsorize=False)
    fixed = metric(plugin_manager, "fork-consistent", winsorize=False)
    var = np.maximum(0, SQ - MEAN ** 2)
    e = (Y - X).astype(np.float64)
    den = (X ** 2) @ var + (X @ MEAN) ** 2
    num_fork = (e ** 2) @ SQ + (e @ MEAN) ** 2
    num_fixed = (e ** 2) @ var + (e @ MEAN) ** 2
    stats = ColumnStats(SQ, MEAN)
    assert fork.slice_error(X, Y, stats, ctx()) == pytest.approx((num_fork / den).mean() * 10, rel=1e-6)
    assert fixed.slice_error(X, Y, stats, ctx()) == pytest.approx((num_fixed / den).mean() * 10, rel=1e-6)
    # the fork counts the mean twice: its numerator is never smaller
    assert fork.slice_error(X, Y, stats, ctx()) > fixed.slice_error(X, Y, stats, ctx())
    # with E[a] = 0 both are the weighted relative error
    zero = ColumnStats(SQ, np.zeros(4, dtype=np.float32))
    assert fork.slice_error(X, Y, zero, ctx()) == pytest.approx(fixed.slice_error(X, Y, zero, ctx()))
    assert fork.slice_error(X, Y, zero, ctx()) == pytest.approx(metric(plugin_manager, "wmse").slice_error(X, Y, ColumnStats(SQ), ctx()))


def test_fork_cosine_error_for_query_and_key(plugin_manager):
    fork = metric(plugin_manager, "fork", inner_product_boost=False)
    stats = ColumnStats(SQ, MEAN)
    # a scaled copy points the same way: no cosine error, although the energy error is large
    assert fork.slice_error(X, 2 * X, stats, ctx("blk.0.attn_q.weight")) == pytest.approx(0.0, abs=1e-12)
    assert fork.slice_error(X, 2 * X, stats, ctx("blk.0.attn_v.weight")) > 1.0
    # without E[a] the fork does not use the cosine form
    assert fork.slice_error(X, 2 * X, ColumnStats(SQ), ctx("blk.0.attn_q.weight")) > 1.0
    y = X.copy()
    y[0, 1] = -2.0  # flips part of row 1
    w = SQ.astype(np.float64)
    x64 = X.astype(np.float64)
    cos = (x64[0] * y[0] * w).sum() / math.sqrt((x64[0] ** 2 * w).sum() * (y[0].astype(np.float64) ** 2 * w).sum())
    assert fork.slice_error(X, y, stats, ctx("blk.0.attn_k.weight")) == pytest.approx((1 - cos) / 2 * 10, rel=1e-9)


def test_fork_inner_product_boost(plugin_manager):
    plain = metric(plugin_manager, "fork", inner_product_boost=False)
    boosted = metric(plugin_manager, "fork")
    stats = ColumnStats(SQ)
    for bpw, factor in ((2.0, 2.0), (3.0, 1.5), (8.5, 1 + 0.5 * 2 ** -5.5)):
        c = ctx("blk.0.attn_output.weight", bpw=bpw)
        assert boosted.slice_error(X, Y, stats, c) == pytest.approx(factor * plain.slice_error(X, Y, stats, c), rel=1e-6)
    c = ctx("blk.0.ffn_gate.weight", bpw=2.0)
    assert boosted.slice_error(X, Y, stats, c) == plain.slice_error(X, Y, stats, c)


def test_ffn_down_rows_are_clipped_only_at_low_bpw(plugin_manager):
    fork = metric(plugin_manager, "fork")
    rows = np.zeros((2, 64), dtype=np.float32)
    rows[:, ::2] = 1.0
    rows[:, 1::2] = -1.0
    rows[0, 5] = 100.0
    low, high = ctx("blk.3.ffn_down.weight", bpw=2.0625), ctx("blk.3.ffn_down.weight", bpw=4.5)
    clipped = fork.prepare_rows(rows, low)
    assert clipped[0, 5] < 100.0 and clipped[0, 5] == pytest.approx(rows[0].mean() + 4 * rows[0].std(), rel=1e-5)
    assert np.array_equal(clipped[1], rows[1])  # nothing beyond 4 sigma there
    assert fork.prepare_rows(rows, high) is rows
    assert fork.prepare_rows(rows, ctx("blk.3.ffn_up.weight", bpw=2.0)) is rows
    assert metric(plugin_manager, "fork", ffn_down_clip=False).prepare_rows(rows, low) is rows
    # the error is measured against the clipped rows: reconstructing them exactly costs nothing
    assert fork.slice_error(rows, clipped, ColumnStats(), low) == 0.0
    assert clip_rows(np.full((1, 8), 3.0, dtype=np.float32), 4.0)[0, 0] == 3.0


def test_winsorize_caps_outliers_in_log_space():
    sq = np.full(64, 1.0, dtype=np.float32) * np.exp(np.linspace(-0.5, 0.5, 64)).astype(np.float32)
    sq[7] = 1e6
    capped = winsorize(sq)
    assert capped[7] < 100 and np.array_equal(np.delete(capped, 7), np.delete(sq, 7))
    few = np.zeros(64, dtype=np.float32)
    few[:5] = [1, 2, 3, 4, 1e6]
    assert np.array_equal(winsorize(few), few)  # fewer than 8 positive entries: untouched


def test_trimmed_mean():
    v = np.arange(200, dtype=np.float64)
    assert trimmed_mean(v, 0.01) == pytest.approx(np.arange(2, 198).mean())
    assert trimmed_mean(v[:99], 0.01) == pytest.approx(v[:99].mean())  # under 100 values: plain mean
    assert trimmed_mean(np.array([]), 0.01) == 0.0


def test_infinite_and_zero_rows(plugin_manager):
    m = metric(plugin_manager, "mse")
    zeros = np.zeros((1, 4), dtype=np.float32)
    assert m.slice_error(zeros, zeros + 1, ColumnStats(), ctx()) == 0.0  # no energy: counted as no error
    bad = np.array([[np.inf, 0, 0, 0]], dtype=np.float32)
    assert math.isinf(m.slice_error(X[:1], bad, ColumnStats(), ctx()))


def test_options_are_validated(plugin_manager):
    with pytest.raises(TbpwError, match="has no option 'trim'"):
        metric(plugin_manager, "wmse", trim=0.1)
    with pytest.raises(TbpwError, match="trim_fraction"):
        metric(plugin_manager, "mse", trim_fraction=0.7)


def test_cnif_ranks_fragile_tensors_higher():
    def st(h_norm, l2):
        return {"sum_sq": 100.0, "h_norm": h_norm, "l2_dist": l2, "cossim": 0.9, "pearson": 0.9}

    stats = {f"blk.{i}.ffn_up.weight": st(90 - i, 1.0) for i in range(10)}
    stats["token_embd.weight"] = st(10, 1.0)
    f = fork_factors.cnif_factors(stats, {})
    assert "token_embd.weight" not in f  # heads stay at 1
    values = [f[f"blk.{i}.ffn_up.weight"] for i in range(10)]
    assert values == sorted(values) and values[0] < 1.0 < values[-1]
    assert max(values) <= math.exp(0.40) and min(values) >= math.exp(-0.40)
    # under 8 tensors: rank scale exp(beta (2p - 1)), p spread evenly over [0, 1]
    small = fork_factors.cnif_factors({f"blk.{i}.attn_q.weight": st(90 - i, 1.0) for i in range(3)},
                                      {f"blk.{i}.attn_q.weight": True for i in range(3)})
    assert [round(small[f"blk.{i}.attn_q.weight"], 9) for i in range(3)] == [round(math.exp(0.25 * v), 9) for v in (-1, 0, 1)]


def test_condition_number_of_a_known_spectrum():
    rng = np.random.default_rng(3)
    m, n, rank = 300, 64, 22  # rank <= 25: the randomised range finder is exact
    u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    a = (u * np.geomspace(50, 1, rank)) @ v.T
    normed = a / np.linalg.norm(a, axis=1, keepdims=True)
    s = np.linalg.svd(normed, compute_uv=False)
    blocks = lambda: iter([a[:100].astype(np.float32), a[100:].astype(np.float32)])  # noqa: E731
    assert fork_factors.condition_number(blocks, n) == pytest.approx(s[0] / s[19], rel=1e-4)
    assert math.isinf(fork_factors.condition_number(lambda: iter([a[:1].astype(np.float32)]), n))
    assert fork_factors.squash_kappa(math.inf) == 5.0 and fork_factors.squash_kappa(1.0) == 1.0


def test_fork_tensor_factor_needs_stats(plugin_manager, fork_imatrix, stock_imatrix, tiny_model):
    from tbpw.imatrix.reader import Imatrix
    from tbpw.model.inventory import ModelInventory

    inv = ModelInventory.load(tiny_model)
    rows = inv.rows("blk.0.attn_v.weight")
    sample = TensorSample("blk.0.attn_v.weight", "attn_v", 256, 256, lambda: iter([rows]))
    names = tuple(t.name for t in inv.tensors if t.quantizable)
    with_stats = metric(plugin_manager, "fork")
    with_stats.setup(MeasureSetup(inv, Imatrix.load(fork_imatrix), names))
    factor = with_stats.tensor_factor(sample, ctx("blk.0.attn_v.weight"))
    assert 1.0 < factor < 5.0 * math.exp(0.4)
    without = metric(plugin_manager, "fork")
    without.setup(MeasureSetup(inv, Imatrix.load(stock_imatrix), names))
    assert without.tensor_factor(sample, ctx("blk.0.attn_v.weight")) == 1.0
    off = metric(plugin_manager, "fork", cnif=False, condition_number=False)
    off.setup(MeasureSetup(inv, Imatrix.load(fork_imatrix), names))
    assert off.tensor_factor(sample, ctx("blk.0.attn_v.weight")) == 1.0
