"""Reading imatrices: the fork's GGUF (with in_sum and stats), stock GGUF, legacy .dat; matching a model."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from tbpw.errors import TbpwError
from tbpw.imatrix.reader import Imatrix
from tbpw.llamacpp.tools import run_tool
from tbpw.model.inventory import ModelInventory
from testmodels.gguf_writers import write_expert_tensor_file, write_imatrix


def _raw(path, name):
    return {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}[name]


def test_fork_imatrix_has_means_and_stats(fork_imatrix, tiny_model):
    imx = Imatrix.load(fork_imatrix)
    assert imx.format == "gguf" and imx.has_means and imx.has_stats
    assert len(imx.names()) == 28 and imx.chunk_count == 16 and imx.chunk_size == 256
    name = "blk.0.ffn_down.weight"
    sums2, sums, counts = (_raw(fork_imatrix, f"{name}.{s}") for s in ("in_sum2", "in_sum", "counts"))
    assert imx.sq(name).shape == (1, 768) and imx.sq(name).dtype == np.float32
    # exactly llama-quantize's float32 division
    assert np.array_equal(imx.importance(name)[0], sums2 / np.float32(counts[0]))
    assert np.array_equal(imx.mean(name)[0], sums / np.float32(counts[0]))
    assert imx.counts(name).tolist() == [4096.0]
    stats = imx.stats(name)
    assert set(stats) >= {"sum_sq", "h_norm", "l2_dist", "cossim", "pearson"} and stats["elements"] == 768.0
    match = imx.check_against(ModelInventory.load(tiny_model))
    assert match.missing == ["token_embd.weight"] and match.extra == [] and len(match.used) == 28


def test_stock_imatrix_has_no_means(stock_imatrix, fork_imatrix):
    stock, fork = Imatrix.load(stock_imatrix), Imatrix.load(fork_imatrix)
    assert not stock.has_means and not stock.has_stats
    assert stock.mean("blk.1.attn_q.weight") is None and stock.stats("blk.1.attn_q.weight") is None
    # same calibration run: the second moments agree
    assert np.array_equal(stock.importance("blk.1.attn_q.weight"), fork.importance("blk.1.attn_q.weight"))
    assert stock.content_hash() != fork.content_hash()


def test_experts_with_no_tokens_get_unit_weights(tmp_path):
    sums2 = np.arange(3 * 64, dtype=np.float32).reshape(3, 64) + 1
    path = write_imatrix(tmp_path / "moe.imatrix.gguf", {
        "blk.0.ffn_down_exps.weight": {"in_sum2": sums2, "in_sum": sums2 / 10, "counts": np.array([4, 0, 2])}})
    imx = Imatrix.load(path)
    sq, mean = imx.sq("blk.0.ffn_down_exps.weight"), imx.mean("blk.0.ffn_down_exps.weight")
    assert sq.shape == (3, 64)
    assert np.array_equal(sq[0], sums2[0] / 4) and np.array_equal(sq[2], sums2[2] / 2)
    assert np.all(sq[1] == 1.0) and np.all(mean[1] == 0.0)
    model = ModelInventory.load(write_expert_tensor_file(tmp_path / "m.gguf", 64, 16, 3))
    assert imx.check_against(model).used == ["blk.0.ffn_down_exps.weight"]
    wrong_experts = ModelInventory.load(write_expert_tensor_file(tmp_path / "m4.gguf", 64, 16, 4))
    with pytest.raises(TbpwError, match="3 experts .* the model has 4"):
        imx.check_against(wrong_experts)


def test_mismatched_imatrix_is_refused(tmp_path, tiny_model):
    inv = ModelInventory.load(tiny_model)
    wide = write_imatrix(tmp_path / "wide.gguf", {
        "blk.0.attn_q.weight": {"in_sum2": np.ones((1, 512)), "counts": np.array([1])},
        "blk.9.attn_q.weight": {"in_sum2": np.ones((1, 256)), "counts": np.array([1])}})
    with pytest.raises(TbpwError, match="512 columns for blk.0.attn_q.weight.*256"):
        Imatrix.load(wide).check_against(inv)
    other = write_imatrix(tmp_path / "other.gguf", {"blk.9.attn_q.weight": {"in_sum2": np.ones((1, 256)), "counts": np.array([1])}})
    with pytest.raises(TbpwError, match="names none of the tensors"):
        Imatrix.load(other).check_against(inv)
    # an extra entry alone is reported, not refused
    extra = write_imatrix(tmp_path / "extra.gguf", {
        "blk.0.attn_q.weight": {"in_sum2": np.ones((1, 256)), "counts": np.array([1])},
        "blk.9.attn_q.weight": {"in_sum2": np.ones((1, 256)), "counts": np.array([1])}})
    assert Imatrix.load(extra).check_against(inv).extra == ["blk.9.attn_q.weight"]


def test_unreadable_files_are_user_errors(tmp_path, tiny_model):
    with pytest.raises(TbpwError, match="does not exist"):
        Imatrix.load(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x01\x02\x03")
    with pytest.raises(TbpwError, match="neither a GGUF imatrix nor a legacy"):
        Imatrix.load(junk)
    with pytest.raises(TbpwError, match="no imatrix data"):
        Imatrix.load(tiny_model)


@pytest.mark.tools
def test_legacy_dat_from_llama_imatrix_reads_the_same(tiny_model, stock_imatrix, run_dir):
    dat = run_dir / "tiny.imatrix.dat"
    run_tool("llama-imatrix", ["-m", tiny_model, "--in-file", stock_imatrix, "--output-format", "dat", "-o", dat],
             log_path=run_dir / "imatrix.log")
    legacy, gguf = Imatrix.load(dat), Imatrix.load(stock_imatrix)
    assert legacy.format == "dat" and legacy.datasets == ["wiki-sample.txt"]
    assert legacy.names() == gguf.names()
    assert legacy.check_against(ModelInventory.load(tiny_model)).missing == ["token_embd.weight"]
    for name in gguf.names():
        np.testing.assert_allclose(legacy.importance(name), gguf.importance(name), rtol=1e-6)
    assert legacy.mean("blk.0.attn_q.weight") is None


def _entries(path):
    imx = Imatrix.load(path)
    return {n: {"in_sum2": imx.entries[n].in_sum2.copy(), "counts": imx.entries[n].counts.copy()} for n in imx.names()}


BROKEN = [
    ("a NaN sum", "in_sum2", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 3, np.nan, v), "NaN or infinite"),
    ("an infinite sum", "in_sum2", lambda v: v + np.inf, "NaN or infinite"),
    ("a negative sum of squares", "in_sum2", lambda v: -v, "negative values"),
    ("a negative count", "counts", lambda v: -v, "negative values"),
    ("all-zero squares of a tensor that saw tokens", "in_sum2", np.zeros_like, "every E[a^2] of blk.0.attn_v.weight is zero"),
]


@pytest.mark.parametrize("what,part,change,words", BROKEN, ids=[b[0] for b in BROKEN])
def test_impossible_imatrix_values_are_refused(tmp_path, stock_imatrix, what, part, change, words):
    entries = _entries(stock_imatrix)
    entries["blk.0.attn_v.weight"][part] = change(entries["blk.0.attn_v.weight"][part]).astype(np.float32)
    with pytest.raises(TbpwError) as err:
        Imatrix.load(write_imatrix(tmp_path / "broken.gguf", entries))
    assert words in str(err.value) and "blk.0.attn_v.weight" in str(err.value) and "\n" not in str(err.value)


def test_an_imatrix_where_nothing_saw_a_token_is_refused(tmp_path, stock_imatrix):
    entries = {n: {"in_sum2": np.zeros_like(e["in_sum2"]), "counts": np.zeros_like(e["counts"])}
               for n, e in _entries(stock_imatrix).items()}
    with pytest.raises(TbpwError, match="no tensor saw any token"):
        Imatrix.load(write_imatrix(tmp_path / "empty.gguf", entries))


def test_an_imatrix_of_another_model_is_refused_before_planning(tmp_path, tiny_model):
    from tbpw.allocate.service import Planner

    other = write_imatrix(tmp_path / "other.gguf", {"blk.0.attn_q.weight": {"in_sum2": np.ones((1, 512)),
                                                                           "counts": np.array([4.0])}})
    with pytest.raises(TbpwError, match="has 512 columns for blk.0.attn_q.weight, the model's rows have 256"):
        _ = Planner(tiny_model, other).imatrix_match
