"""tbpw's own activation collector (vendor/native/collector) against stock llama-imatrix, llama-quantize and
the fork; `tbpw imatrix` and the imatrix statistics.

The mixture-of-experts model is made here from the tiny llama (its FFNs turned into 4 perturbed experts,
2 used per token, with a random router): small, deterministic, and exercising MUL_MAT_ID routing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tbpw.errors import TbpwError
from tbpw.imatrix.reader import Imatrix
from tbpw.imatrix.stats import (
    cosine,
    distribution_stats,
    previous_layer_name,
    tensor_statistics,
)
from tbpw.llamacpp import collector as coll
from tbpw.llamacpp.build import BuildInfo
from tbpw.llamacpp.imatrix import make_imatrix
from tbpw.llamacpp.tools import run_tool

DATA = Path(__file__).resolve().parent / "data"
MOE_EXPERTS, MOE_USED = 4, 2
RTOL = 1e-4


def make_tiny_moe(src: Path, dst: Path, n_layers: int = 2, seed: int = 0) -> Path:
    """A llama MoE from the tiny llama: attention kept, each FFN copied into perturbed experts."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, "llama")
    rng = np.random.default_rng(seed)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = n_layers if key == "llama.block_count" else field.contents()
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub)
    writer.add_key_value("llama.expert_count", MOE_EXPERTS, GGUFValueType.UINT32)
    writer.add_key_value("llama.expert_used_count", MOE_USED, GGUFValueType.UINT32)
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= n_layers:
            continue
        if parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
            base = np.array(t.data, dtype=np.float32)
            experts = np.stack([base * (1 + 0.3 * rng.standard_normal(base.shape, dtype=np.float32))
                                for _ in range(MOE_EXPERTS)])
            writer.add_tensor(f"blk.{parts[1]}.{parts[2]}_exps.weight", experts.astype(np.float16))
            if parts[2] == "ffn_gate":
                router = rng.standard_normal((MOE_EXPERTS, base.shape[1]), dtype=np.float32)
                writer.add_tensor(f"blk.{parts[1]}.ffn_gate_inp.weight", router)
            continue
        writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def moe_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_moe(tiny_model, tmp_path_factory.mktemp("moe") / "tiny-moe-f16.gguf")


def _both(model: Path, text: Path, folder: Path, **kw) -> tuple[Imatrix, Imatrix]:
    stock = make_imatrix(model, text, folder / "stock.gguf", collector="stock", threads=2, **kw)
    ours = make_imatrix(model, text, folder / "tbpw.gguf", collector="tbpw", threads=2, **kw)
    return Imatrix.load(stock.path), Imatrix.load(ours.path)


@pytest.fixture(scope="module")
def dense_pair(tiny_model: Path, wiki_text: Path, tmp_path_factory: pytest.TempPathFactory):
    # The fork's fixture imatrix was made with -c 256 --chunks 16 on this model and text.
    return _both(tiny_model, wiki_text, tmp_path_factory.mktemp("dense"), ctx=256, chunks=16)


@pytest.fixture(scope="module")
def moe_pair(moe_model: Path, wiki_text: Path, tmp_path_factory: pytest.TempPathFactory):
    return _both(moe_model, wiki_text, tmp_path_factory.mktemp("moe-imatrix"), ctx=256, chunks=12)


def _assert_same_as_stock(stock: Imatrix, ours: Imatrix) -> None:
    assert ours.names() == stock.names()
    for name in stock.names():
        s, o = stock.entry(name), ours.entry(name)
        np.testing.assert_array_equal(o.counts, s.counts, err_msg=name)
        np.testing.assert_allclose(o.in_sum2, s.in_sum2, rtol=RTOL, atol=0, err_msg=name)
        assert o.in_sum is not None and o.in_sum.shape == o.in_sum2.shape
        assert stock.entry(name).in_sum is None
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (stock.chunk_count, stock.chunk_size, stock.datasets)


# ----- equality with stock llama-imatrix -----

@pytest.mark.tools
def test_dense_in_sum2_and_counts_equal_stock(dense_pair):
    stock, ours = dense_pair
    _assert_same_as_stock(stock, ours)
    assert len(ours.names()) == 28 and ours.chunk_count == 16 and ours.chunk_size == 256
    assert all(ours.counts(n)[0] == 16 * 256 for n in ours.names())  # every token of every chunk counts


@pytest.mark.tools
def test_moe_in_sum2_and_counts_equal_stock_per_expert(moe_pair):
    stock, ours = moe_pair
    _assert_same_as_stock(stock, ours)
    tokens = 12 * 256
    for layer in (0, 1):
        counts = ours.counts(f"blk.{layer}.ffn_down_exps.weight")
        assert counts.shape == (MOE_EXPERTS,) and counts.sum() == MOE_USED * tokens
        assert (counts > 0).all() and len(set(counts.tolist())) > 1  # routed unevenly, every expert used


@pytest.mark.tools
def test_moe_expert_sums_add_up_to_the_router_input(moe_pair):
    # gate/up experts and the router multiply the same normalised hidden state; each token goes to
    # MOE_USED experts, so the per-expert sums add up to MOE_USED times the router's sums.
    _, ours = moe_pair
    for layer in (0, 1):
        router = ours.entry(f"blk.{layer}.ffn_gate_inp.weight")
        for kind in ("gate", "up"):
            experts = ours.entry(f"blk.{layer}.ffn_{kind}_exps.weight")
            for field in ("in_sum2", "in_sum"):
                got = getattr(experts, field).astype(np.float64).sum(axis=0)
                want = MOE_USED * getattr(router, field)[0].astype(np.float64)
                np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


@pytest.mark.tools
@pytest.mark.slow
def test_gemma4_moe_fixture_equals_stock(wiki_text: Path, tmp_path: Path):
    """The Gemma 4 MoE of tests/fixtures (python -m testmodels.make_tiny_moe): fused gate_up experts, a shared FFN,
    sliding-window layers; one expert of layer 1 gets no token on this text (partial data)."""
    from tbpw.llamacpp.convert import convert_hf, missing_modules

    if missing := missing_modules():
        pytest.skip(f"the convert extra is not installed ({', '.join(missing)})")
    model = convert_hf(Path(__file__).resolve().parent / "fixtures" / "tiny-moe-hf", tmp_path / "g4-moe.gguf",
                       outtype="f16").output
    stock, ours = _both(model, wiki_text, tmp_path, ctx=256, chunks=8)
    _assert_same_as_stock(stock, ours)
    experts = [n for n in ours.names() if "_exps." in n]
    assert experts and all(ours.entry(n).n_experts == 4 for n in experts)


# ----- in_sum checked another way -----

@pytest.mark.tools
def test_in_sum_equals_the_forks_collector(dense_pair, fork_imatrix: Path):
    _, ours = dense_pair
    fork = Imatrix.load(fork_imatrix)
    assert fork.names() == ours.names()
    for name in fork.names():
        want = fork.entry(name).in_sum
        np.testing.assert_allclose(ours.entry(name).in_sum, want, rtol=RTOL, atol=RTOL * np.abs(want).max(),
                                   err_msg=name)


@pytest.mark.tools
def test_first_layer_sums_recomputed_from_the_embeddings(tiny_model: Path, tmp_path: Path):
    """The text "the the the ..." tokenizes to BOS then one repeated token, so the input of blk.0's
    attention is RMSNorm(embedding) * attn_norm of two known rows: recompute both sums in numpy."""
    from gguf import GGUFReader

    text = tmp_path / "the.txt"
    text.write_text("the" + " the" * 3000 + "\n")
    ctx, chunks = 64, 4
    run = make_imatrix(tiny_model, text, tmp_path / "the.gguf", collector="tbpw", ctx=ctx, chunks=chunks, threads=2)
    got = Imatrix.load(run.path).entry("blk.0.attn_q.weight")

    model = GGUFReader(tiny_model)
    tensors = {t.name: t for t in model.tensors}
    eps = float(model.get_field("llama.attention.layer_norm_rms_epsilon").contents())
    bos = int(model.get_field("tokenizer.ggml.bos_token_id").contents())
    the = model.get_field("tokenizer.ggml.tokens").contents().index("▁the")
    embd = np.array(tensors["token_embd.weight"].data, dtype=np.float64)
    norm_w = np.array(tensors["blk.0.attn_norm.weight"].data, dtype=np.float64)

    def normed(row: np.ndarray) -> np.ndarray:
        return row / np.sqrt(np.mean(row * row) + eps) * norm_w

    # every chunk: BOS in place of its first token, then ctx-1 times "▁the"
    want_sum = chunks * (normed(embd[bos]) + (ctx - 1) * normed(embd[the]))
    want_sum2 = chunks * (normed(embd[bos]) ** 2 + (ctx - 1) * normed(embd[the]) ** 2)
    assert got.counts[0] == chunks * ctx
    np.testing.assert_allclose(got.in_sum[0], want_sum, rtol=RTOL, atol=RTOL * np.abs(want_sum).max())
    np.testing.assert_allclose(got.in_sum2[0], want_sum2, rtol=RTOL)


# ----- llama-quantize reads the collector's file -----

@pytest.mark.tools
@pytest.mark.parametrize("which", ["dense", "moe"])
def test_quantize_output_identical_with_either_imatrix(which, request, tiny_model: Path, moe_model: Path,
                                                       tmp_path: Path):
    stock, ours = request.getfixturevalue(f"{which}_pair")
    model = tiny_model if which == "dense" else moe_model
    # llama-quantize records the imatrix path in the output: give both runs the same one.
    imatrix = tmp_path / "imatrix.gguf"
    outputs = {}
    for label, source in (("stock", stock.path), ("tbpw", ours.path), ("none", None)):
        args = [str(model), str(tmp_path / f"{label}.gguf"), "IQ4_XS", "2"]
        if source is not None:
            shutil.copyfile(source, imatrix)
            args = ["--imatrix", str(imatrix), *args]
        run_tool("llama-quantize", args, log_path=tmp_path / f"{label}.log")
        outputs[label] = (tmp_path / f"{label}.gguf").read_bytes()
    assert outputs["tbpw"] == outputs["stock"]
    assert outputs["none"] != outputs["stock"]  # the imatrix really steered the quantization


# ----- errors, build integration -----

@pytest.mark.tools
def test_too_little_text_is_a_one_line_error(tiny_model: Path, tmp_path: Path):
    text = tmp_path / "short.txt"
    text.write_text("A few words only.\n")
    with pytest.raises(TbpwError, match="tokens") as err:
        make_imatrix(tiny_model, text, tmp_path / "out.gguf", collector="tbpw", ctx=128)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.gguf").exists()


def test_unknown_collector_is_refused(tmp_path: Path):
    with pytest.raises(TbpwError, match="stock, tbpw"):
        make_imatrix(tmp_path / "m.gguf", tmp_path / "t.txt", tmp_path / "o.gguf", collector="fork")


@pytest.mark.tools
def test_changed_collector_source_is_recompiled_once(active_build: BuildInfo, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, tiny_model: Path,
                                                     wiki_text: Path):
    build_root = tmp_path / "build"
    shutil.copytree(active_build.bin_dir, build_root / "bin", symlinks=True)
    if (active_build.root / "include").is_dir():
        shutil.copytree(active_build.root / "include", build_root / "include")
    shutil.copyfile(active_build.root / "build.json", build_root / "build.json")
    vendor = tmp_path / "vendor"
    shutil.copytree(coll.source_dir().parent.parent, vendor, ignore=shutil.ignore_patterns("*.gguf"))
    source = vendor / "native" / "collector" / "collector.cpp"
    source.write_text(source.read_text() + "\n// a change that only the hash sees\n")
    monkeypatch.setenv("TBPW_VENDOR", str(vendor))

    info = BuildInfo.load(build_root)
    assert not coll.is_current(info)
    exe = coll.ensure_built(info)
    assert coll.is_current(info)
    assert json.loads((build_root / "build.json").read_text())["collector"]["hash"] == coll.source_hash()
    stamp = exe.stat().st_mtime_ns
    assert coll.ensure_built(info) == exe and exe.stat().st_mtime_ns == stamp  # nothing changed: no compile
    run = make_imatrix(tiny_model, wiki_text, tmp_path / "o.gguf", collector="tbpw", ctx=128, chunks=2, build=info)
    assert Imatrix.load(run.path).has_means


@pytest.mark.tools
def test_collector_that_does_not_compile_leaves_the_build_usable(active_build: BuildInfo, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture):
    build_root = tmp_path / "build"
    shutil.copytree(active_build.bin_dir, build_root / "bin", symlinks=True)
    shutil.copyfile(active_build.root / "build.json", build_root / "build.json")
    (build_root / "bin" / coll.NAME).unlink(missing_ok=True)
    vendor = tmp_path / "vendor"
    shutil.copytree(coll.source_dir().parent.parent, vendor)
    (vendor / "native" / "collector" / "collector.cpp").write_text("int main() { return undeclared_name; }\n")
    monkeypatch.setenv("TBPW_VENDOR", str(vendor))
    info = BuildInfo.load(build_root)

    with pytest.raises(TbpwError, match="compiling tbpw-collector failed") as err:
        coll.ensure_built(info)
    assert "undeclared_name" in (err.value.details or "") and "\n" not in str(err.value)
    coll.compile_or_warn(info)  # what `tbpw build` does: a warning, not a failure
    assert "warning: compiling tbpw-collector failed" in capsys.readouterr().err
    assert not (build_root / "bin" / coll.NAME).exists()


# ----- statistics -----

def _stock_statistics() -> dict[tuple[int, str], list[float]]:
    """Rows of `llama-imatrix -m tiny-f16.gguf --in-file tiny.stock-imatrix.gguf --show-statistics` (captured)."""
    rows = {}
    for line in (DATA / "llama-imatrix-show-statistics.tiny.txt").read_text().splitlines():
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) == 13 and cells[0].split()[-1].isdigit():
            layer = int(cells[0].split()[-1])
            rows[(layer, cells[1])] = [float(c.rstrip("%")) for c in cells[2:]]
    return rows


def test_statistics_agree_with_llama_imatrix(stock_imatrix: Path):
    stock = _stock_statistics()
    ours = {(s.layer, s.name.split(".")[2]): s for s in tensor_statistics(Imatrix.load(stock_imatrix))}
    assert len(stock) == 28 and set(ours) == set(stock)
    for key, (total, lo, hi, mean, std, active, n, entropy, h_norm, zd, cossim) in stock.items():
        s = ours[key]
        assert s.elements == n
        assert s.sum == pytest.approx(total, abs=0.006)
        assert (s.min, s.max) == (pytest.approx(lo, abs=6e-5), pytest.approx(hi, abs=6e-5))
        assert (s.mean, s.std) == (pytest.approx(mean, abs=0.006), pytest.approx(std, abs=0.006))
        assert 100 * s.active == pytest.approx(active, abs=0.006)
        assert s.entropy == pytest.approx(entropy, abs=6e-5)
        assert 100 * s.entropy_norm == pytest.approx(h_norm, abs=0.006)
        assert 100 * s.zd == pytest.approx(zd, abs=0.006)
        assert (s.cossim or 0.0) == pytest.approx(cossim, abs=6e-5)
        assert (s.cossim is None) == (key[0] == 0)


def test_distribution_statistics_of_known_vectors():
    flat = distribution_stats(np.full(8, 2.0))
    assert flat["entropy"] == pytest.approx(3.0) and flat["entropy_norm"] == pytest.approx(1.0)
    assert flat["std"] == 0 and flat["zd"] == 0 and flat["mean"] == 2.0 and flat["active"] == 1.0
    peaked = distribution_stats(np.array([1.0, 0.0, 0.0, 0.0]))
    assert peaked["entropy"] == 0 and peaked["active"] == 0.25 and peaked["zd"] == 0.25
    assert cosine(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert previous_layer_name("blk.10.ffn_up.weight") == "blk.9.ffn_up.weight"
    assert previous_layer_name("blk.0.ffn_up.weight") is None and previous_layer_name("output.weight") is None


@pytest.mark.tools
def test_statistics_skip_experts_without_tokens(moe_pair):
    ours = Imatrix.load(moe_pair[1].path)  # a private copy: the entry is changed below
    name = "blk.1.ffn_up_exps.weight"
    entry = ours.entry(name)
    entry.counts[0] = 0  # as if expert 0 had never been routed to
    by_name = {s.name: s for s in tensor_statistics(ours)}
    s = by_name[name]
    assert (s.experts, s.experts_seen, s.elements) == (MOE_EXPERTS, MOE_EXPERTS - 1, (MOE_EXPERTS - 1) * entry.ncols)
    want = (entry.in_sum2[1:] / entry.counts[1:, None]).astype(np.float64)
    assert s.mean == pytest.approx(want.mean(), rel=1e-6)


# ----- command line -----

@pytest.mark.tools
def test_cli_make_and_stats(tiny_model: Path, wiki_text: Path, tmp_path: Path):
    from tbpw.cli import main

    out = tmp_path / "cli.gguf"
    runner = CliRunner()
    made = runner.invoke(main, ["imatrix", str(tiny_model), "-f", str(wiki_text), "-o", str(out),
                                "--collector", "tbpw", "--ctx", "128", "--chunks", "4", "-t", "2"])
    assert made.exit_code == 0, made.output
    assert re.search(r"28 tensors from 4 chunks of 128 tokens, with E\[a\]", made.output)
    shown = runner.invoke(main, ["imatrix", "stats", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    rows = json.loads(shown.output)
    assert len(rows) == 28 and all(r["ea_mean"] is not None for r in rows)
    assert [r["cossim"] is None for r in rows] == [r["layer"] == 0 for r in rows]
    table = runner.invoke(main, ["imatrix", "stats", str(out)])
    assert table.exit_code == 0 and "blk.3.ffn_down.weight" in table.output and "E[a²]" in table.output
    missing = runner.invoke(main, ["imatrix", "stats", str(tmp_path / "nope.gguf")])
    assert missing.exit_code == 2 and missing.output.startswith("error: ") and "nope.gguf" in missing.output
