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

from tbpw import hookimpl


@hookimpl
def tbpw_register_metrics(register) -> None:
    # imported here, so that loading the plugin (e.g. for `tbpw --help`) imports no numpy
    from .fork import ForkConsistentMetric, ForkMetric
    from .wmse import MseMetric, WmseMetric

    for cls in (MseMetric, WmseMetric, ForkMetric, ForkConsistentMetric):
        register(cls)
