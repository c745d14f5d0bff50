"""Built-in metrics, registered through the `tbpw` entry-point group like any third-party plugin.

Every metric returns, per slice (one expert of a 3-D tensor, or the whole 2-D tensor), the mean of a
per-row relative error over the sampled rows times the slice's row count (the fork's scale: an estimate
of the sum of relative row errors over the whole slice); tbpw adds the slices. Errors of different
tensors are therefore comparable the way the fork compares them.

- ``mse``: relative squared error of the weights, |y - x|^2 / |x|^2 per row. Ignores the imatrix.
- ``wmse``: imatrix-weighted relative error, sum s e^2 / sum s x^2 per row with s = E[a^2]: the share of
  the row's expected output energy E[(x.a)^2] (diagonal approximation) lost to quantization. Falls back
  to ``mse`` for tensors without imatrix data.
- ``fork``: the target-bpw fork's exact estimate (see ForkOptions): output-energy error with the E[a] term,
  winsorised weights, weighted cosine error for attn_q/attn_k-like tensors, trimmed mean, ffn_down rows
  clipped at mean +- 4 sigma under 3 bpw, and its multipliers (inner-product boost, CNIF, condition
  number). Reproduces the fork's state file.
- ``fork-consistent``: ``fork`` with the numerator fixed: the fork divides sum s e^2 + (sum m e)^2
  (E[a^2] already contains the mean, so it is counted twice) by sum (s - m^2) x^2 + (sum m x)^2; this
  variant uses the variance s - m^2 in both, i.e. the exact expected output error e^T (diag(var) + m m^T) e
  relative to the same form of x.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tbpw.contracts import ColumnStats, MeasureSetup, MetricContext, PluginOptions, TensorSample
from tbpw.hookspecs import hookimpl

from . import fork_factors

_EPSILON = 1e-12


def trimmed_mean(values: np.ndarray, fraction: float) -> float:
    """Mean without the `fraction` smallest and largest values (from 100 values on, as the fork does)."""
    n = values.size
    if n == 0:
        return 0.0
    if fraction <= 0 or n < 100:
        return float(values.sum() / n)
    k = int(n * fraction)
    kept = np.sort(values)[k:n - k] if k else values
    return float(kept.sum() / max(1.0, float(n - 2 * k)))


def winsorize(sq: np.ndarray) -> np.ndarray:
    """Cap E[a^2] at exp(median(ln v) + 4 * 1.4826 * MAD(ln v)) over its positive entries (float32, as the fork).

    Left alone when fewer than 8, or fewer than half, of the entries are positive, or when the MAD is ~0.
    The fork takes the upper median (element n/2 of the sorted values) for both statistics.
    """
    sq = np.asarray(sq, dtype=np.float32)
    positive = sq[sq > 0]
    if positive.size < 8 or positive.size < sq.size // 2:
        return sq
    logs = np.log(positive).astype(np.float32)
    mid = logs.size // 2
    med = np.float32(np.partition(logs, mid)[mid])
    dev = np.abs(logs - med).astype(np.float32)
    mad = np.float32(np.partition(dev, mid)[mid])
    if mad <= np.float32(1e-6) * max(np.float32(1.0), abs(med)):
        return sq
    cap = np.exp(np.float32(med + np.float32(4.0) * np.float32(1.4826) * mad), dtype=np.float32)
    return np.minimum(sq, cap)


def relative_rows(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per row; 0 where den <= 1e-12; infinity where the ratio is not finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > _EPSILON, num / np.where(den > _EPSILON, den, 1.0), 0.0)
    return np.where(np.isfinite(out), out, np.inf)


# ----- mse / wmse -----


class MseOptions(PluginOptions):
    trim_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="share of rows dropped at each end before averaging")


class MseMetric:
    name = "mse"
    description = "relative squared error of the weights per row, x rows (ignores the imatrix)"
    Options = MseOptions

    def __init__(self, options: MseOptions):
        self.options = options
        # Unit column weights: exactly wmse without an imatrix.
        self._unweighted = WmseMetric(WmseOptions(trim_fraction=options.trim_fraction))

    def prepare_rows(self, rows: np.ndarray, context: MetricContext) -> np.ndarray:
        return rows

    def slice_error(self, original: np.ndarray, reconstructed: np.ndarray, stats: ColumnStats,
                    context: MetricContext) -> float:
        return self._unweighted.slice_error(original, reconstructed, ColumnStats(), context)


class WmseOptions(PluginOptions):
    trim_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="share of rows dropped at each end before averaging")
    winsorize: bool = Field(False, description="cap outlying E[a^2] weights as the fork does")


class WmseMetric:
    name = "wmse"
    description = "imatrix-weighted relative error sum E[a^2] e^2 / sum E[a^2] x^2 per row, x rows"
    Options = WmseOptions

    def __init__(self, options: WmseOptions):
        self.options = options

    def prepare_rows(self, rows: np.ndarray, context: MetricContext) -> np.ndarray:
        return rows

    def slice_error(self, original: np.ndarray, reconstructed: np.ndarray, stats: ColumnStats,
                    context: MetricContext) -> float:
        x = original.astype(np.float64)
        e = reconstructed.astype(np.float64) - x
        if stats.sq is None:
            w = np.ones(x.shape[1])
        else:
            sq = winsorize(stats.sq) if self.options.winsorize else stats.sq
            w = np.maximum(np.asarray(sq, dtype=np.float64), 0.0)
        rows = relative_rows((e * e) @ w, (x * x) @ w)
        return trimmed_mean(rows, self.options.trim_fraction) * context.slice_rows


# ----- fork -----


class ForkOptions(PluginOptions):
    """Each of the fork's choices, switchable. All on (the defaults) reproduces the fork's numbers."""

    mean_term: bool = Field(True, description="use E[a] (the (sum m e)^2 term) where the imatrix has it")
    winsorize: bool = Field(True, description="cap outlying E[a^2] weights (metric only; quantization gets the raw ones)")
    cosine_for_qk: bool = Field(True, description="weighted cosine error for attn_q/attn_k/attn_qkv/attn_q_a/attn_q_b (needs E[a^2] and E[a])")
    trim_fraction: float = Field(0.01, ge=0.0, lt=0.5, description="trimmed mean of the row errors (from 100 rows on)")
    ffn_down_clip: bool = Field(True, description="clip ffn_down rows to mean +- clip_sigma * std before quantizing, below clip_below_bpw")
    clip_sigma: float = Field(4.0, gt=0)
    clip_below_bpw: float = Field(3.0, description="nominal bpw under which ffn_down rows are clipped")
    inner_product_boost: bool = Field(True, description="x (1 + 0.5 * 2^(3 - bpw)) for attn_q/attn_k/attn_o/attn_v")
    cnif: bool = Field(True, description="x the CNIF rank factor from the imatrix .stats (fork imatrices only)")
    condition_number: bool = Field(True, description="x (1 + 4 tanh(0.15 ln kappa)) from the sampled weights (only with .stats, as the fork)")


class ForkMetric:
    name = "fork"
    description = "the target-bpw fork's error estimate, every heuristic included (reproduces its state file)"
    Options = ForkOptions
    consistent = False  # the fork's numerator uses E[a^2], its denominator the variance

    def __init__(self, options: ForkOptions):
        self.options = options
        self._cnif: dict[str, float] = {}
        self._use_stats = False

    # -- once per measurement --

    def setup(self, setup: MeasureSetup) -> None:
        imx = setup.imatrix
        self._use_stats = bool(imx is not None and imx.has_stats)
        self._cnif = {}
        if not (self._use_stats and self.options.cnif):
            return
        stats, cosine = {}, {}
        for name in setup.tensors:
            st = imx.stats(name)
            if st is None:
                continue
            stats[name] = st
            cosine[name] = (self.options.cosine_for_qk and name in imx and imx.mean(name) is not None
                            and fork_factors.is_angle_sensitive(name))
        self._cnif = fork_factors.cnif_factors(stats, cosine)

    # -- per tensor --

    def tensor_factor(self, sample: TensorSample, context: MetricContext) -> float:
        factor = 1.0
        if self.options.cnif:
            factor *= self._cnif.get(sample.tensor, 1.0)
        if self.options.condition_number and self._use_stats:
            factor *= fork_factors.squash_kappa(fork_factors.condition_number(sample.blocks, sample.n_cols))
        return float(np.float32(factor))

    # -- per slice and candidate --

    def _clips(self, context: MetricContext) -> bool:
        return self.options.ffn_down_clip and "ffn_down" in context.tensor and context.nominal_bpw < self.options.clip_below_bpw

    def prepare_rows(self, rows: np.ndarray, context: MetricContext) -> np.ndarray:
        if not self._clips(context):
            return rows
        return clip_rows(rows, self.options.clip_sigma)

    def slice_error(self, original: np.ndarray, reconstructed: np.ndarray, stats: ColumnStats,
                    context: MetricContext) -> float:
        o = self.options
        sq = stats.sq
        mean = stats.mean if o.mean_term else None
        s = None if sq is None else (winsorize(sq) if o.winsorize else np.asarray(sq, dtype=np.float32))
        x = original.astype(np.float64)
        y = reconstructed.astype(np.float64)
        if s is not None and mean is not None and o.cosine_for_qk and fork_factors.is_angle_sensitive(context.tensor):
            error = _cosine_error(x, y, np.maximum(s.astype(np.float64), 0.0)) * context.slice_rows
        else:
            # The clipped rows were quantized; the error is measured against them, the norm against the
            # rows as stored (the clipping error itself is not counted: the fork's optimism).
            x_eval = clip_rows(original, o.clip_sigma).astype(np.float64) if self._clips(context) else x
            error = self._energy_error(x, y - x_eval, s, mean) * context.slice_rows
        if o.inner_product_boost and fork_factors.is_inner_product_sensitive(context.tensor):
            error *= float(np.float32(1.0) + np.float32(0.5) * np.float32(2.0) ** (np.float32(3.0) - np.float32(context.nominal_bpw)))
        return error

    def _energy_error(self, x: np.ndarray, e: np.ndarray, s: np.ndarray | None, mean: np.ndarray | None) -> float:
        if s is not None and mean is not None:
            m = mean.astype(np.float64)
            w = np.maximum(s.astype(np.float64), 0.0)
            var = np.maximum(0.0, s.astype(np.float64) - m * m)
            den = (x * x) @ var + (x @ m) ** 2
            num = (e * e) @ (var if self.consistent else w) + (e @ m) ** 2
        elif s is not None:
            w = np.maximum(s.astype(np.float64), 0.0)
            den = (x * x) @ w
            num = (e * e) @ w
        else:
            den = np.einsum("ij,ij->i", x, x)
            num = np.einsum("ij,ij->i", e, e)
        return trimmed_mean(relative_rows(num, den), self.options.trim_fraction)


class ForkConsistentOptions(ForkOptions):
    pass


class ForkConsistentMetric(ForkMetric):
    name = "fork-consistent"
    description = "the fork's estimate with the variance in numerator and denominator (fixes its double-counted mean)"
    Options = ForkConsistentOptions
    consistent = True


def _cosine_error(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Mean over rows of 1 - cos_w(x, y), the cosine under the inner product sum_j w_j a_j b_j."""
    dot = (x * y) @ w
    nx = (x * x) @ w
    ny = (y * y) @ w
    prod = nx * ny
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(prod > _EPSILON, dot / np.sqrt(np.where(prod > _EPSILON, prod, 1.0)),
                       np.where((nx <= _EPSILON) & (ny <= _EPSILON), 1.0, 0.0))
    cos = np.clip(cos, -1.0, 1.0)
    return float((1.0 - cos).sum() / max(1, cos.size))


def clip_rows(rows: np.ndarray, sigma: float) -> np.ndarray:
    """Each row clamped to its mean +- sigma * std (float32, as the fork; rows with a tiny spread are kept)."""
    r = np.asarray(rows, dtype=np.float32)
    mean = r.astype(np.float64).mean(axis=1).astype(np.float32)
    var = r.astype(np.float64).var(axis=1).astype(np.float32)
    clip = (np.float32(sigma) * np.sqrt(np.maximum(var, np.float32(0.0)))).astype(np.float32)
    lo = (mean - clip)[:, None]
    hi = (mean + clip)[:, None]
    clipped = np.minimum(np.maximum(r, lo), hi)
    return np.where((clip > np.float32(1e-4))[:, None], clipped, r).astype(np.float32)


@hookimpl
def tbpw_register_metrics(register) -> None:
    for cls in (MseMetric, WmseMetric, ForkMetric, ForkConsistentMetric):
        register(cls)

