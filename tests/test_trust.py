"""Nothing on disk is trusted because it is there: every cache entry and record tbpw reads back carries its size and
hash (tbpw.files.sealed) and is checked on read; a damaged one is made again, with a note, and the result is the
one a clean run gives. Leftovers of killed writers are swept, and the calibration and evaluation texts' overlap
is measured."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from instances import allocator

from tbpw.allocate.service import Planner
from tbpw.files import atomic, sealed
from tbpw.llamacpp.perplexity import KldScore
from tbpw.model.budget import Target
from tbpw.model.inventory import ModelInventory
from tbpw.quantize.store import TensorStore
from tbpw.select.scoring import Scorer


def test_a_seal_finds_a_cut_an_edited_and_an_unrecorded_file(tmp_path):
    file = tmp_path / "entry.bin"
    file.write_bytes(b"abcd" * 1000)
    assert sealed.problem(file) == ("it has no record of its size and hash (cut short while written, or made before "
                                    "tbpw kept one)")
    sealed.write_seal(file)
    assert sealed.problem(file) is None
    file.write_bytes(b"abcd" * 999)
    assert sealed.problem(file) == "it is 3996 bytes, 4000 were written"
    file.write_bytes(b"abce" + b"abcd" * 999)  # the same size, other bytes
    assert sealed.problem(file) == "its content is not what was written (its sha256 differs)"
    notes: list[str] = []
    assert not sealed.trusted(file, "test entry", notes.append)
    assert not file.exists() and not sealed.seal_path(file).exists()
    assert notes == [f"note: discarded the damaged test entry {file} (its content is not what was written (its sha256 "
                     "differs)); it is made again"]
    file.mkdir()  # something else in its place
    assert sealed.problem(file) == "it is a folder, not a file"


def _damaged(blob: Path, how: str, other: Path) -> None:
    data = blob.read_bytes()
    if how == "garbled":
        blob.write_bytes(data[:100] + os.urandom(4096)[: len(data) - 100] + data[4196:])
    elif how == "zeroed":
        blob.write_bytes(bytes(len(data)))
    elif how == "swapped":  # another tensor's blob copied over it, as many bytes
        blob.write_bytes((other.read_bytes() * (len(data) // max(1, other.stat().st_size) + 1))[: len(data)])
    elif how == "truncated":
        blob.write_bytes(data[: len(data) // 2])
    else:  # a folder where the blob was
        blob.unlink()
        blob.mkdir()
        (blob / "x").write_text("not a blob")
    assert blob.is_dir() or blob.read_bytes() != data


@pytest.mark.tools
@pytest.mark.parametrize("how", ["garbled", "zeroed", "swapped", "truncated", "folder"])
def test_a_damaged_store_blob_is_quantized_again_and_the_quant_is_a_clean_runs(how, tiny_model, stock_imatrix,
                                                                               fork_error_table, tmp_path, capfd):
    store = TensorStore(tmp_path / "store", threads=2)
    planner = Planner(tiny_model, stock_imatrix, threads=2, store=store)
    plan = planner.plan(fork_error_table, Target.parse(bpw=4.5), allocator("knapsack"))
    clean = planner.write(plan, tmp_path / "clean.gguf").path.read_bytes()
    source = store.source(tiny_model, stock_imatrix)
    stored = {t.name: t.stored_type for t in ModelInventory.load(tiny_model).tensors}
    quantized = [(n, t) for n, t in plan.types().items() if t != stored[n]]
    biggest = max(quantized, key=lambda nt: source.path(*nt).stat().st_size)
    victim = source.path(*biggest)
    other = source.path(*next(nt for nt in quantized if nt != biggest))
    _damaged(victim, how, other)
    capfd.readouterr()
    again = Planner(tiny_model, stock_imatrix, threads=2, store=store).write(plan, tmp_path / "again.gguf")
    assert again.assembled and again.quantized == 1  # the damaged blob alone was made again
    assert again.path.read_bytes() == clean
    err = capfd.readouterr().err
    assert f"note: discarded the damaged tensor store blob of {biggest[0]} as {biggest[1]} {victim} (" in err
    assert victim.is_file() and sealed.problem(victim) is None


@pytest.mark.tools
def test_a_blob_a_killed_writer_left_is_swept(tiny_model, stock_imatrix, tmp_path):
    store = TensorStore(tmp_path / "store", threads=2)
    source = store.source(tiny_model, stock_imatrix)
    name = next(t.name for t in source.inventory.tensors if t.quantizable)
    source.ensure(name, "Q4_K")
    folder = source.folder
    dead = atomic.temporary_prefix(folder / "x.bin").replace(f"-{os.getpid()}.", "-999999999.")
    leftover = folder / f"{dead}abc.tmp"
    leftover.write_bytes(b"half a blob")
    mine = folder / f"{atomic.temporary_prefix(folder / 'y.bin')}abc.tmp"  # this process's: still being written
    mine.write_bytes(b"in flight")
    store.source(tiny_model, stock_imatrix).folder  # noqa: B018 (opening the model's folder sweeps it)
    assert not leftover.exists() and mine.exists()


@pytest.mark.tools
def test_garbled_float_logits_are_made_again_and_no_score_is_kept_from_them(tiny_model, stock_imatrix, split_text,
                                                                            fork_error_table, tmp_path):
    cal, _ = split_text
    planner = Planner(tiny_model, stock_imatrix, threads=2)
    plan = planner.plan(fork_error_table, Target.parse(bpw=4.0), allocator("knapsack"))
    quant = planner.write(plan, tmp_path / "q.gguf").path
    notes: list[str] = []

    def scorer() -> Scorer:
        return Scorer(tiny_model, cal, imatrix=stock_imatrix, ctx=128, chunks=2, threads=2, cache_dir=tmp_path / "cal",
                      log=notes.append)

    first = scorer()
    good = first.score(quant, plan.types(), 2)
    assert good.finite() and first.base_runs == 1
    logits = first.folder / "base.logits"
    data = bytearray(logits.read_bytes())
    data[-8192:] = os.urandom(8192)  # garbled, the same size
    logits.write_bytes(bytes(data))
    for kept in (first.folder / "scores").glob("*.json"):  # make it score again, against the garbled file
        sealed.discard(kept)
    second = scorer()
    again = second.score(quant, plan.types(), 2)
    assert second.base_runs == 1 and any("discarded the damaged float logits" in n for n in notes)
    assert again.kld_mean == pytest.approx(good.kld_mean)


@pytest.mark.tools
def test_a_kept_score_that_is_edited_or_not_finite_is_never_used(tiny_model, stock_imatrix, split_text,
                                                                 fork_error_table, tmp_path):
    cal, _ = split_text
    planner = Planner(tiny_model, stock_imatrix, threads=2)
    plan = planner.plan(fork_error_table, Target.parse(bpw=4.0), allocator("knapsack"))
    quant = planner.write(plan, tmp_path / "q.gguf").path
    scorer = Scorer(tiny_model, cal, imatrix=stock_imatrix, ctx=128, chunks=2, threads=2, cache_dir=tmp_path / "cal")
    good = scorer.score(quant, plan.types(), 2)
    [kept] = (scorer.folder / "scores").glob("*.json")
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "kld_mean": 1e-9}))  # a better number, by hand
    assert scorer.lookup(plan.types(), 2) is None and not kept.exists()
    kept.write_text(json.dumps({**good.to_json(), "kld_mean": math.inf}))
    sealed.write_seal(kept)  # even sealed, a score that is not finite is refused
    assert scorer.lookup(plan.types(), 2) is None
    assert KldScore(math.nan, 0, 0, 0, 0, 0).finite() is False


@pytest.mark.tools
def test_a_partial_line_with_a_cut_candidate_list_is_measured_again(tiny_model, stock_imatrix, tmp_path, monkeypatch):
    from instances import measure

    from tbpw.measure import engine

    cache = tmp_path / "cache"
    kw = {"metric": "wmse", "candidates": ["Q4_K", "Q6_K", "Q8_0"], "cache_dir": cache, "progress": False,
          "threads": 2}
    full = measure(tiny_model, stock_imatrix, **kw)
    folder = cache / full.meta["key"]
    first = full.tensors[0]
    cut = first.to_json()
    cut["candidates"] = cut["candidates"][:1]  # what a hand edit (or a bug) could leave: one type only
    lines = [engine.partial_line(type(first).from_json(cut)),  # its checksum matches: the candidates are checked
             engine.partial_line(full.tensors[1]).replace('"error": ', '"error": 1', 1)]  # edited: the checksum
    sealed.discard(folder / "table.json")
    (folder / "partial.jsonl").write_text("".join(lines))
    again = measure(tiny_model, stock_imatrix, **kw)
    assert [t.to_json() for t in again.tensors] == [t.to_json() for t in full.tensors]
    assert again.meta["resumed_tensors"] == 0


def test_an_edited_manifest_result_makes_its_stage_run_again(tmp_path, capfd):
    from tbpw.stages.rundir import MANIFEST, RunDir

    runs = []

    def body(folder: Path) -> dict:
        (folder / "out.txt").write_text("made")
        runs.append(1)
        return {"kld": 0.5}

    run_dir = RunDir(tmp_path / "run")
    assert run_dir.run("stage", {}, {}, body).result == {"kld": 0.5}
    assert run_dir.run("stage", {}, {}, body).skipped and len(runs) == 1
    manifest = tmp_path / "run" / "stage" / MANIFEST
    data = json.loads(manifest.read_text())
    data["result"]["kld"] = 0.001  # a better number, by hand
    manifest.write_text(json.dumps(data))
    again = run_dir.run("stage", {}, {}, body)
    assert not again.skipped and again.result == {"kld": 0.5} and len(runs) == 2
    assert "does not hold the result it recorded: the stage runs again" in capfd.readouterr().err
    run_dir.close()


def test_overlap_of_calibration_and_evaluation_text_is_measured(tmp_path):
    from tbpw.data.overlap import WARN_SHARE, overlap

    words = [f"w{i}" for i in range(4000)]
    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, 2000, 20)))
    held_out = tmp_path / "ev.txt"
    held_out.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(2000, 4000, 20)))
    leaked = tmp_path / "leak.txt"
    leaked.write_text(cal.read_text())
    clean, dirty = overlap(cal, held_out), overlap(cal, leaked)
    assert clean.sequences == 0 and clean.lines == 0 and not clean.worrying
    assert dirty.sequences == 1 and dirty.lines == 1 and dirty.worrying and dirty.sequences > WARN_SHARE
    shutil.rmtree(tmp_path)


@pytest.mark.tools
def test_a_file_of_the_models_shape_that_names_another_model_is_doubted(tiny_model, tmp_path):
    from tbpw.llamacpp.quantize import quantize
    from tbpw.stages.compare import another_name

    named = tmp_path / "named.gguf"
    quantize(tiny_model, named, imatrix=None, base_type="Q8_0", threads=2, kv={"general.name": "Some Other Model"})
    model, other = ModelInventory.load(tiny_model), ModelInventory.load(named)
    assert model.metadata("general.name") == "Spm4K H256 Long" and another_name(model, model) is None
    assert another_name(model, other) == ("it names itself 'Some Other Model', the run's model 'Spm4K H256 Long': it "
                                          "may be a quant of another model")


def test_a_file_far_worse_than_every_quant_of_the_run_is_doubted():
    from tbpw.run.report import Entry, flag_strangers

    entries = [Entry("stock-Q4_K_M", "stock", 4.8, 1, metrics={"kld_mean": 0.01}),
               Entry("quant-4.5bpw-choose", "tbpw", 4.5, 1, metrics={"kld_mean": 0.008}),
               Entry("other-near", "other", 4.6, 1, metrics={"kld_mean": 0.02}, note="not made by this run: local file a"),
               Entry("other-far", "other", 4.6, 1, metrics={"kld_mean": 2.0}, note="not made by this run: local file b")]
    warnings = flag_strangers(entries, "kld_mean")
    assert warnings == ["warning: other-far: its kld_mean 2 is more than 10x every quant this run made: it may be a "
                        "quant of another model"]
    assert entries[2].note == "not made by this run: local file a" and "another model" in entries[3].note


def test_a_run_warns_when_its_texts_overlap(tmp_path, wiki_text):
    from tbpw.data.files import DatasetFile
    from tbpw.stages import overlap
    from tbpw.stages.context import RunSettings, StageContext

    logs: list[str] = []
    ctx = StageContext(RunSettings(output_dir=tmp_path / "run"), logs.append, claim=True)
    same = DatasetFile(wiki_text, "text")
    try:
        found = overlap.run(ctx, same, same)
    finally:
        ctx.close()
    assert found["sequences"] == 1.0 and found["lines"] == 1.0
    assert [line for line in logs if line.startswith("warning: ")] == [
        "warning: the calibration and evaluation texts overlap: 100.0% of the evaluation text's 13-word sequences and "
        "100.0% of its long lines occur in the calibration text (over 5%): the report's numbers are flattered; give "
        "texts that do not share passages"]
