"""The target-bpw fork's error estimate, exactly, and a variant with its numerator made consistent.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tbpw import ColumnStats, ErrorMetric, MeasureSetup, MetricContext, PluginOptions, TensorSample

from . import fork_factors
from .rows import clip_rows, cosine_error, relative_rows, trimmed_mean, winsorize


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


class ForkMetric(ErrorMetric):
    name = "fork"
    description = "the target-bpw fork's error estimate, every heuristic included (reproduces its state file)"
    Options = ForkOptions
    consistent = False  # the fork's numerator uses E[a^2], its denominator the variance

    def __init__(self, options: ForkOptions):
        super().__init__(options)
        self._cnif: dict[str, float] = {}
        self._use_stats = False

    # -- once per measurement --

    def setup(self, setup: MeasureSetup) -> None:
        imx = setup.imatrix
        self._use_stats = bool(imx is not None and imx.has_stats)
        self._cnif = {}
        if imx is None or not (self._use_stats and self.options.cnif):
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
            error = cosine_error(x, y, np.maximum(s.astype(np.float64), 0.0)) * context.slice_rows
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

