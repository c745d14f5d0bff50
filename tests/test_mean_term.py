"""The `fork` metric uses E[a] when the imatrix has it (issue: activation statistics on stock llama.cpp)."""

from __future__ import annotations

import pytest
from instances import measure

from tbpw.imatrix.reader import Imatrix

TENSOR = "blk.1.ffn_up.weight"


def _error(model, imatrix, cache, mean_term: bool) -> float:
    table = measure(model, imatrix, metric="fork", metric_options={"mean_term": mean_term, "cnif": False,
                                                                      "condition_number": False},
                    candidates=["Q4_K"], tensors=[TENSOR], cache_dir=cache, progress=False, threads=1)
    return table.by_name()[TENSOR].candidate("Q4_K").error


@pytest.mark.tools
def test_the_mean_activation_term_changes_the_error_only_when_present(tmp_path, tiny_model, fork_imatrix, stock_imatrix):
    assert Imatrix.load(fork_imatrix).mean(TENSOR) is not None
    assert Imatrix.load(stock_imatrix).mean(TENSOR) is None
    with_mean = _error(tiny_model, fork_imatrix, tmp_path, True)
    without_mean = _error(tiny_model, fork_imatrix, tmp_path, False)
    assert with_mean > 0 and without_mean > 0
    assert abs(with_mean - without_mean) / without_mean > 1e-3
    # a stock imatrix has no E[a]: the option has nothing to act on
    assert _error(tiny_model, stock_imatrix, tmp_path, True) == _error(tiny_model, stock_imatrix, tmp_path, False)
