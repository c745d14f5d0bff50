"""Relative squared error of the weights, plain (mse) or weighted by E[a^2] (wmse).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tbpw import ColumnStats, ErrorMetric, MetricContext, PluginOptions

from .rows import relative_rows, trimmed_mean, winsorize


class MseOptions(PluginOptions):
    trim_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="share of rows dropped at each end before averaging")


class MseMetric(ErrorMetric):
    name = "mse"
    description = "relative squared error of the weights per row, x rows (ignores the imatrix)"
    Options = MseOptions

    def __init__(self, options: MseOptions):
        super().__init__(options)
        # Unit column weights: exactly wmse without an imatrix.
        self._unweighted = WmseMetric(WmseOptions(trim_fraction=options.trim_fraction))


    def slice_error(self, original: np.ndarray, reconstructed: np.ndarray, stats: ColumnStats,
                    context: MetricContext) -> float:
        return self._unweighted.slice_error(original, reconstructed, ColumnStats(), context)


class WmseOptions(PluginOptions):
    trim_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="share of rows dropped at each end before averaging")
    winsorize: bool = Field(False, description="cap outlying E[a^2] weights as the fork does")


class WmseMetric(ErrorMetric):
    name = "wmse"
    description = "imatrix-weighted relative error sum E[a^2] e^2 / sum E[a^2] x^2 per row, x rows"
    default = True
    Options = WmseOptions



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

