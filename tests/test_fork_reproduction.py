"""tbpw's `fork` metric, with the fork's imatrix and sampling, reproduces the fork's state file.

The fixture (../shared/fixtures/fork-tiny) holds the fork's own `tiny.bpw_state`: for each of the 29
tensors it decides, the candidates it kept after its filters, with bytes and error. tbpw measures all
candidates, applies the fork's reduction (candidates.fork_pareto) and must land on the same types and
the same errors.

Tolerance: every error within 1e-4 relative; all types but IQ1_M within 1e-6 (float32 rounding of the
per-tensor factor). IQ1_M differs by up to 7.4e-5 on three tensors: the fork's ggml (another llama.cpp
revision) quantizes a few IQ1_M blocks differently from b11312's, which tbpw uses.
"""

from __future__ import annotations

import pytest
from instances import measure

from tbpw.measure import forkstate
from tbpw.measure.candidates import fork_pareto
from tbpw.measure.engine import plan_tensor
from tbpw.measure.table import ErrorTable
from tbpw.model.ggml_types import FORK_TYPES
from tbpw.model.inventory import ModelInventory

pytestmark = [pytest.mark.tools, pytest.mark.slow]


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_model, fork_imatrix) -> ErrorTable:
    return measure(tiny_model, fork_imatrix, metric="fork", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def state(fork_tiny_dir) -> ErrorTable:
    return ErrorTable.from_fork_state(forkstate.read(fork_tiny_dir / "tiny.bpw_state"))


def test_the_fork_samples_every_row_of_the_tiny_model(tiny_model):
    inv = ModelInventory.load(tiny_model)
    for t in inv.tensors:
        if t.quantizable:
            (sl,) = plan_tensor(t, has_mean=True)
            assert len(sl.rows) == t.n_rows  # at most 1024 rows, or 4096 rows of 256 within the 1 Mi budget


def test_candidates_before_the_fork_filters(measured):
    for t in measured.tensors:
        types = [c.type for c in t.candidates]
        if t.name == "token_embd.weight":  # no imatrix data: no IQ type
            assert types == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "BF16"]
        else:
            assert sorted(types) == sorted(FORK_TYPES)


def test_kept_types_bytes_and_errors_match_the_state_file(measured, state):
    ours = measured.by_name()
    assert sorted(ours) == sorted(state.by_name())
    worst = 0.0
    for ref in state.tensors:
        kept = fork_pareto(ours[ref.name].candidates)
        assert [c.type for c in kept] == [c.type for c in ref.candidates], ref.name
        assert [c.bytes for c in kept] == [c.bytes for c in ref.candidates], ref.name
        for mine, theirs in zip(kept, ref.candidates):
            rel = abs(mine.error - theirs.error) / abs(theirs.error)
            worst = max(worst, rel)
            assert rel <= (1e-4 if mine.type == "IQ1_M" else 1e-6), (ref.name, mine.type, mine.error, theirs.error)
    assert worst > 0.0  # a real comparison, not a copy


def test_without_the_convex_hull_more_points_survive(measured, state):
    monotone = sum(len(fork_pareto(t.candidates, convex=False)) for t in measured.tensors)
    assert monotone > sum(len(t.candidates) for t in state.tensors)
