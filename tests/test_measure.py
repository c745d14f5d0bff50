"""The measurement engine: sampling, per-expert slices, the cache and its key, resuming, export, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from instances import measure

from tbpw.imatrix.reader import Imatrix
from tbpw.measure.engine import MeasurementInterrupted, plan_tensor
from tbpw.measure.sampling import (
    HASH_MAGIC,
    MT19937,
    SamplingOptions,
    djb2,
    normal_float32,
    rows_per_slice,
    sample_rows,
    uniform_int,
)
from tbpw.measure.slices import ColumnStats, MetricContext
from tbpw.measure.table import ErrorTable
from tbpw.model.inventory import ModelInventory
from testmodels.gguf_writers import write_expert_tensor_file, write_imatrix

DATA = Path(__file__).parent / "data" / "captured" / "libstdcxx-random.txt"
FEW = ["blk.0.attn_v.weight", "blk.1.ffn_down.weight", "blk.2.attn_q.weight"]


# ----- sampling -----


def test_random_streams_equal_libstdcxx():
    lines = [line.split() for line in DATA.read_text().splitlines() if line and not line.startswith("#")]
    offsets = [p for p in lines if p[0] == "offset"]
    normals = [p for p in lines if p[0] == "normal"]
    assert len(offsets) == 96 and len(normals) == 32
    for _, name, expert, stride, offset, h in offsets:
        assert djb2(name.encode()) == int(h)
        rng = MT19937(djb2(name.encode()) ^ HASH_MAGIC ^ int(expert))
        assert uniform_int(rng, 0, int(stride) - 1) == int(offset), (name, expert, stride)
    for ncols, nrows in {(int(p[1]), int(p[2])) for p in normals}:
        seed = (ncols * 0x9E3779B97F4A7C15 + nrows * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        draws = normal_float32(MT19937(seed), 4001)
        for p in normals:
            if (int(p[1]), int(p[2])) == (ncols, nrows):
                assert draws[int(p[3])] == np.float32(float(p[4]))


def test_rows_per_slice_follows_the_fork_budget():
    fork = _opts(sampled_share=1)
    assert rows_per_slice(4096, 4096, 1, True, fork) == 512  # 1 Mi / 4096 = 256, raised to 512
    assert rows_per_slice(256, 4096, 1, True, fork) == 4096  # 1 Mi / 256 = 4096 rows
    assert rows_per_slice(256, 4096, 1, False, fork) == 2048  # half the budget without E[a]
    assert rows_per_slice(2048, 14336, 1, True, fork) == 958  # x sqrt(14336 / 4096) = 1.87
    assert rows_per_slice(4096, 1000, 1, True, fork) == 1000  # at most 2 x 512 rows: all of them
    assert rows_per_slice(256, 4096, 8, True, fork) == 512  # experts split the budget
    assert rows_per_slice(256, 4096, 8, True, _opts(scale=0.25, sampled_share=1)) == 128
    assert rows_per_slice(256, 4096, 8, True, _opts(all_rows=True)) == 4096


def test_the_default_is_exact_where_the_fork_is_and_a_fifth_where_it_samples():
    assert rows_per_slice(256, 4096, 1, True) == 4096  # the fork's budget covers every row: all of them
    assert rows_per_slice(4096, 1000, 1, True) == 1000  # small slices stay whole
    assert rows_per_slice(4096, 4096, 1, True) == 102  # the fork samples 512 of 4096: a fifth of that
    assert rows_per_slice(2048, 14336, 1, True) == 192  # 958 / 5
    assert rows_per_slice(256, 4096, 1, False) == 410  # 2048 / 5


def _opts(**kw):
    from tbpw.measure.sampling import SamplingOptions

    return SamplingOptions(**kw)


def test_sample_rows_are_strided_and_reproducible():
    rows = sample_rows("blk.3.ffn_up.weight", 0, 14336, 958)
    assert len(rows) == 958 and np.all(np.diff(rows) >= 14) and rows[-1] < 14336
    assert np.array_equal(rows, sample_rows("blk.3.ffn_up.weight", 0, 14336, 958))
    assert not np.array_equal(rows, sample_rows("blk.3.ffn_up.weight", 1, 14336, 958))
    assert np.array_equal(sample_rows("x", 0, 300, 1000), np.arange(300))


# ----- a 3-D expert tensor -----


@pytest.mark.tools
def test_expert_tensor_is_sampled_and_measured_per_expert(tmp_path, plugin_manager):
    name = "blk.0.ffn_down_exps.weight"
    n_experts, n_rows, n_cols = 8, 4096, 256
    model = write_expert_tensor_file(tmp_path / "moe.gguf", n_cols, n_rows, n_experts)
    rng = np.random.default_rng(5)
    sums2 = (rng.random((n_experts, n_cols)) * 100 + 1).astype(np.float32)
    counts = np.array([100, 0, 50, 80, 10, 10, 10, 10], dtype=np.float32)  # expert 1 saw no token
    imx_path = write_imatrix(tmp_path / "moe.imatrix.gguf", {name: {"in_sum2": sums2, "in_sum": sums2 / 50, "counts": counts}})
    inv, imx = ModelInventory.load(model), Imatrix.load(imx_path)
    info = inv[name]

    fork = plan_tensor(info, has_mean=True, sampling=SamplingOptions(sampled_share=1))
    assert all(len(sl.rows) == 512 for sl in fork)  # the fork: 1 Mi over 8 experts -> 256-column rows: 512 each
    plan = plan_tensor(info, has_mean=True)
    assert [sl.expert for sl in plan] == list(range(n_experts))
    assert all(len(sl.rows) == 102 for sl in plan)  # tbpw's default: a fifth of the fork's where it samples
    assert all(np.array_equal(sl.rows, sample_rows(name, sl.expert, n_rows, 102)) for sl in plan)
    assert len({int(sl.rows[0]) for sl in plan}) > 1  # each expert has its own seeded offset

    table = measure(model, imx_path, metric="wmse", candidates=["Q4_K", "IQ4_XS"], cache_dir=tmp_path / "cache",
                    threads=2, progress=False)
    (measured,) = table.tensors
    assert measured.name == name and measured.n_elements == n_experts * n_rows * n_cols
    from tbpw.llamacpp import ggml

    lib, wmse = ggml.load(), plugin_manager.metrics().create("wmse")
    importance = imx.importance(name)
    assert np.all(importance[1] == 1.0)
    for t in ("Q4_K", "IQ4_XS"):
        expected = 0.0
        for sl in plan:
            rows = inv.rows(name, sl.rows, expert=sl.expert)
            y = lib.roundtrip(t, rows, importance[sl.expert])
            c = MetricContext(tensor=name, role="ffn_down_exps", type=t, nominal_bpw=4.5, slice_rows=n_rows, expert=sl.expert)
            expected += wmse.slice_error(rows, y, ColumnStats(importance[sl.expert]), c)
        got = measured.candidate(t)
        assert got.error == pytest.approx(expected, rel=1e-12)
        assert got.bytes == info.bytes_as(t)


# ----- cache -----


def _run(model, imatrix, cache, **kw):
    args = dict(metric="wmse", candidates=["Q4_K", "Q8_0"], tensors=FEW, cache_dir=cache, threads=2, progress=False)
    args.update(kw)
    return measure(model, imatrix, **args)


@pytest.mark.tools
def test_cache_is_reused_only_when_nothing_changed(tmp_path, tiny_model, stock_imatrix):
    cache = tmp_path / "cache"
    first = _run(tiny_model, stock_imatrix, cache)
    assert first.meta["cached"] is False and [t.name for t in first.tensors] == FEW
    again = _run(tiny_model, stock_imatrix, cache)
    assert again.meta["cached"] is True and again.meta["key"] == first.meta["key"]
    assert [t.to_json() for t in again.tensors] == [t.to_json() for t in first.tensors]

    # the same imatrix content under another name is the same key
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(Path(stock_imatrix).read_bytes())
    assert _run(tiny_model, copy, cache).meta["cached"] is True

    # changed imatrix content: recomputed, and the changed tensor's errors move
    imx = Imatrix.load(stock_imatrix)
    entries = {n: {"in_sum2": imx.entries[n].in_sum2, "counts": imx.entries[n].counts} for n in imx.names()}
    entries["blk.0.attn_v.weight"]["in_sum2"] = entries["blk.0.attn_v.weight"]["in_sum2"] * np.linspace(0.1, 10, 256, dtype=np.float32)
    changed = _run(tiny_model, write_imatrix(tmp_path / "changed.gguf", entries), cache)
    assert changed.meta["cached"] is False and changed.meta["key"] != first.meta["key"]
    name = "blk.0.attn_v.weight"
    assert changed.by_name()[name].candidate("Q4_K").error != first.by_name()[name].candidate("Q4_K").error

    # changed metric options: recomputed
    trimmed = _run(tiny_model, stock_imatrix, cache, metric_options={"trim_fraction": 0.02})
    assert trimmed.meta["cached"] is False and trimmed.meta["key"] != first.meta["key"]
    assert _run(tiny_model, stock_imatrix, cache, metric_options={"trim_fraction": 0.02}).meta["cached"] is True
    # another candidate set, another sampling, another metric: other keys
    keys = {first.meta["key"], trimmed.meta["key"], changed.meta["key"],
            _run(tiny_model, stock_imatrix, cache, candidates=["Q4_K"]).meta["key"],
            _run(tiny_model, stock_imatrix, cache, sampling={"scale": 0.5}).meta["key"],
            _run(tiny_model, stock_imatrix, cache, metric="mse").meta["key"]}
    assert len(keys) == 6


@pytest.mark.tools
def test_a_weight_edited_anywhere_is_a_new_measurement(tmp_path, tiny_model, stock_imatrix):
    """Not only the first, middle and last 4 KB of each tensor count: a weight in between does too."""
    model = tmp_path / "model.gguf"
    shutil.copyfile(tiny_model, model)
    cache = tmp_path / "cache"
    first = _run(model, stock_imatrix, cache)
    info = ModelInventory.load(model)[FEW[1]]  # blk.1.ffn_down.weight: 393 kB of F16
    offset = info.data_offset + info.stored_bytes // 4  # far from any of the three old windows
    stamp = model.stat()
    with open(model, "r+b") as fh:
        fh.seek(offset)
        value = np.frombuffer(fh.read(2), dtype=np.float16)
        fh.seek(offset)
        fh.write((value * 4 + 1).astype(np.float16).tobytes())
    os.utime(model, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    edited = _run(model, stock_imatrix, cache)
    assert edited.meta["cached"] is False and edited.meta["key"] != first.meta["key"]
    assert edited.by_name()[FEW[1]].to_json() != first.by_name()[FEW[1]].to_json()


@pytest.mark.tools
def test_a_damaged_or_foreign_cache_entry_is_measured_again(tmp_path, tiny_model, stock_imatrix, capfd):
    from tbpw.files.sealed import write_seal

    cache = tmp_path / "cache"
    first = _run(tiny_model, stock_imatrix, cache)
    final = cache / first.meta["key"] / "table.json"
    good = final.read_text()
    foreign = good.replace(f'"n_elements": {first.tensors[0].n_elements}', '"n_elements": 7', 1)
    # a cut or edited table: its seal (the size and sha256 the measurement wrote) no longer matches
    same_size = good.replace('"error": ', '"error":', 1).replace("}", " }", 1)  # other bytes, as many of them
    assert len(same_size) == len(good) and same_size != good
    for damage, why in ((good[: len(good) // 2], f"it is {len(good) // 2} bytes, {len(good)} were written"),
                        (same_size, "its content is not what was written")):
        final.write_text(damage)
        again = _run(tiny_model, stock_imatrix, cache)
        assert again.meta["cached"] is False
        assert [t.to_json() for t in again.tensors] == [t.to_json() for t in first.tensors]
        err = capfd.readouterr().err
        assert f"note: discarded the damaged cached error table {final} ({why}" in err and "made again" in err
    # a table tbpw wrote for another model (its seal intact): checked against the model all the same
    for damage, note in (('{"tensors": [{"name": 1}]}', "damaged error table"), (foreign, "has 7 elements there")):
        final.write_text(damage)
        write_seal(final)
        again = _run(tiny_model, stock_imatrix, cache)
        assert again.meta["cached"] is False
        err = capfd.readouterr().err
        assert f"note: discarding the cached error table {final}" in err and note in err and "measuring again" in err
    assert _run(tiny_model, stock_imatrix, cache).meta["cached"] is True


@pytest.mark.tools
@pytest.mark.slow
def test_two_measurements_of_one_model_measure_once(tmp_path, tiny_model, stock_imatrix):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "tbpw.cli", "measure", str(tiny_model), "--imatrix", str(stock_imatrix),
           "--types", "Q4_K,Q5_K", "--threads", "1", "--cache-dir", str(cache), "-q"]
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"t{i}.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    measured = [out for out, _ in outputs if "(cache)" not in out]
    assert len(measured) == 1, outputs  # the other one waited and took the finished table
    assert json.loads((tmp_path / "t0.json").read_text())["tensors"] == json.loads((tmp_path / "t1.json").read_text())["tensors"]
    assert len(list(cache.iterdir())) == 1


# ----- interruption -----


class _Stop(Exception):
    pass


@pytest.mark.tools
def test_interrupted_measurement_resumes(tmp_path, tiny_model, stock_imatrix):
    cache = tmp_path / "cache"
    seen: list[str] = []

    def interrupt_after_two(t):
        seen.append(t.name)
        if len(seen) == 2:
            raise KeyboardInterrupt

    kw = dict(metric="wmse", candidates=["Q4_K", "IQ4_XS"], cache_dir=cache, threads=2, progress=False)
    with pytest.raises(MeasurementInterrupted, match="2 of 29 tensors are saved"):
        measure(tiny_model, stock_imatrix, on_tensor=interrupt_after_two, **kw)
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert not (folder / "table.json").exists()
    assert len((folder / "partial.jsonl").read_text().splitlines()) == 2
    # a line cut short by a kill is ignored
    with open(folder / "partial.jsonl", "a") as fh:
        fh.write('{"name": "blk.3.ffn_up.weight", "n_elem')

    resumed = measure(tiny_model, stock_imatrix, **kw)
    assert resumed.meta["resumed_tensors"] == 2 and len(resumed.tensors) == 29
    assert (folder / "table.json").exists() and not (folder / "partial.jsonl").exists()
    fresh = measure(tiny_model, stock_imatrix, **dict(kw, cache_dir=tmp_path / "fresh", threads=1))
    assert [t.to_json() for t in resumed.tensors] == [t.to_json() for t in fresh.tensors]  # thread count does not matter


@pytest.mark.tools
@pytest.mark.slow
def test_sigterm_saves_progress_and_the_next_run_resumes(tmp_path, tiny_model, stock_imatrix):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "tbpw.cli", "measure", str(tiny_model), "--imatrix", str(stock_imatrix),
           "--types", "IQ2_XS,IQ3_S,Q4_K", "--threads", "1", "--cache-dir", str(cache), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        partial = list(cache.glob("*/partial.jsonl"))
        if partial and partial[0].read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM
    assert "measurement interrupted" in err and "run the same command again to resume" in err
    saved = partial[0].read_text().count("\n")
    assert 1 <= saved < 29
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = ErrorTable.read_json(partial[0].parent / "table.json")
    assert len(table.tensors) == 29 and table.meta["resumed_tensors"] == saved


# ----- export and the command line -----


def test_json_and_csv_export(tmp_path):
    from tbpw.measure.table import CandidateError, TensorErrors

    table = ErrorTable([TensorErrors("blk.0.attn_q.weight", 65536, [CandidateError("Q4_K", 36864, 1.5),
                                                                   CandidateError("Q8_0", 69632, 0.25)])],
                       {"metric": "wmse"})
    table.write_json(tmp_path / "t.json")
    back = ErrorTable.read_json(tmp_path / "t.json")
    assert back.to_json() == table.to_json()
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["tensors"][0] == {"name": "blk.0.attn_q.weight", "n_elements": 65536,
                                  "candidates": [{"type": "Q4_K", "bytes": 36864, "error": 1.5},
                                                 {"type": "Q8_0", "bytes": 69632, "error": 0.25}]}
    table.write_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "tensor,n_elements,type,bytes,bpw,error"
    assert lines[1] == "blk.0.attn_q.weight,65536,Q4_K,36864,4.500000,1.5"


def test_fork_state_as_a_table(fork_tiny_dir):
    from tbpw.measure import forkstate

    table = ErrorTable.from_fork_state(forkstate.read(fork_tiny_dir / "tiny.bpw_state"))
    assert len(table.tensors) == 29
    embd = table.by_name()["token_embd.weight"]
    assert [c.type for c in embd.candidates] == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16"]
    assert embd.candidate("Q3_K").bytes == 450560 and embd.n_elements == 1048576


@pytest.mark.tools
def test_cli_measure_writes_the_table(tmp_path, tiny_model, stock_imatrix):
    from tbpw.cli import main

    out = tmp_path / "table.json"
    args = ["measure", str(tiny_model), "--imatrix", str(stock_imatrix), "--types", "Q4_K,Q8_0",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--csv", str(tmp_path / "t.csv")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "29 tensors, 58 candidates measured with wmse" in result.output
    assert "no data for 1 tensor(s) (token_embd.weight)" in result.output
    data = json.loads(out.read_text())
    assert len(data["tensors"]) == 29
    first = data["tensors"][0]
    assert set(first) == {"name", "n_elements", "candidates"}
    assert [set(c) for c in first["candidates"]] == [{"type", "bytes", "error"}] * 2
    again = CliRunner().invoke(main, args + ["-q"])
    assert again.exit_code == 0 and "(cache)" in again.output

    bad = CliRunner().invoke(main, ["measure", str(tiny_model), "--metric", "wmsee"])
    assert bad.exit_code == 2 and "did you mean 'wmse'" in bad.output
    bad_type = CliRunner().invoke(main, ["measure", str(tiny_model), "--types", "Q4_K,Q9_X"])
    assert bad_type.exit_code == 2 and "unknown ggml type 'Q9_X'" in bad_type.output


@pytest.mark.tools
def test_a_third_party_metric_plugs_in(tmp_path, tiny_model, plugin_manager):
    from tbpw import ErrorMetric, hookimpl

    class MaxAbs(ErrorMetric):  # the smallest metric a plugin can bring: a name and slice_error
        name = "max-abs"
        description = "largest absolute weight change"

        def slice_error(self, original, reconstructed, stats, context):
            return float(np.abs(reconstructed - original).max())

    class Plugin:
        @hookimpl
        def tbpw_register_metrics(self, register):
            register(MaxAbs)

    plugin_manager.register(Plugin(), name="test-max-abs")
    table = measure(tiny_model, None, metric="max-abs", candidates=["Q4_0", "Q8_0"], tensors=FEW,
                    cache_dir=tmp_path, progress=False)
    for t in table.tensors:
        assert t.candidate("Q8_0").error < t.candidate("Q4_0").error
    rows = ModelInventory.load(tiny_model).rows(FEW[0])
    from tbpw.llamacpp import ggml

    assert table.tensors[0].candidate("Q4_0").error == float(np.abs(ggml.load().roundtrip("Q4_0", rows) - rows).max())
