"""The model card of a finished tiny run (report/README.md), with a stock quant made outside the run in
`compare_files:`; other people's files of another model are refused in one line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from task_files import hellaswag_from

from tbpw.cli import main
from tbpw.errors import TbpwError
from tbpw.llamacpp.quantize import quantize
from tbpw.model import gguf_layout
from tbpw.model.inventory import ModelInventory
from tbpw.stages import compare
from tbpw.stages.compare import CompareFile
from testmodels.gguf_writers import write_llama_like

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, tiny_model, wiki_text):
    """The tiny recipe on a copy of the tiny model that names its licence and hub repository, with one target,
    one stock type, HellaSwag, llama-bench, and a stock Q5_K_M made outside the run in compare_files."""
    work = tmp_path_factory.mktemp("card")
    model = work / "tiny-f16.gguf"
    quantize(tiny_model, model, imatrix=None, base_type="F16", threads=2,
             kv={"general.license": "apache-2.0", "general.base_model.0.repo_url": "https://huggingface.co/tbpw/tiny"})
    other = work / "downloads" / "tiny-Q5_K_M.gguf"
    other.parent.mkdir()
    quantize(tiny_model, other, imatrix=None, base_type="Q5_K_M", threads=2)
    hellaswag = hellaswag_from(wiki_text, work / "hellaswag.txt", n=6)
    out = work / "run"
    sets = [f"model.gguf={model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}", "targets=[{bpw: 4.5}]",
            "compare_stock=[Q4_K_M]", f"compare_files=[{{path: {other}}}]",
            "measure.candidates=[Q3_K, Q4_K, Q5_K, Q6_K, Q8_0]", "measure.sampling={scale: 0.25}",
            f"datasets.hellaswag={{name: file, options: {{path: {hellaswag}, kind: hellaswag}}}}",
            "evaluators=[{name: kld}, {name: hellaswag, options: {tasks: 6}}]",
            "bench={pp: 16, tg: 4, pg: null, repetitions: 2}"]
    result = CliRunner().invoke(main, ["run", str(RECIPE), *_sets(sets)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report" / "report.json").read_text())
    card = (out / "report" / "README.md").read_text()
    return out, report, card, other


def _section(card: str, title: str) -> list[dict[str, str]]:
    """The rows of the first table under `## title` as {header: cell}."""
    part = card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in part.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.mark.tools
@pytest.mark.slow
def test_the_card_has_hub_front_matter_from_the_source(card_run):
    _, _, card, _ = card_run
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "tbpw/tiny" and front["base_model_relation"] == "quantized"
    assert front["license"] == "apache-2.0" and front["pipeline_tag"] == "text-generation"
    assert {"gguf", "quantized"} <= set(front["tags"])
    assert "\n# tiny GGUF\n" in card


@pytest.mark.tools
@pytest.mark.slow
def test_the_four_tables_carry_every_quant_with_its_uncertainties(card_run):
    out, report, card, other = card_run
    by_name = {e["name"]: e for e in report["entries"]}
    assert set(by_name) == {"baseline", "stock-Q4_K_M", "other-tiny-Q5_K_M", "quant-4.5bpw-knapsack"}
    kept = "**tiny-4.5bpw.gguf**"
    shown = {"stock-Q4_K_M": "llama-quantize Q4_K_M", "other-tiny-Q5_K_M": "tiny-Q5_K_M †",
             "quant-4.5bpw-knapsack": kept}

    quants = _section(card, "Quants")
    assert [r["Model"] for r in quants] == ["float model (baseline)", "tiny-Q5_K_M †", "llama-quantize Q4_K_M", kept]
    assert next(r for r in quants if r["Model"] == kept)["File"] == "[tiny-4.5bpw.gguf](tiny-4.5bpw.gguf)"
    # someone else's file, by its name alone: its folder is the user's own
    assert next(r for r in quants if r["Model"] == "tiny-Q5_K_M †")["Made by"] == "local file tiny-Q5_K_M.gguf"

    quality = {r["Model"]: r for r in _section(card, "Quality against the float model")}
    for name, label in shown.items():
        m = by_name[name]["metrics"]
        row = quality[label]
        assert row["BPW"] == f"{by_name[name]['bpw']:.4f}"
        assert row["μPPL"] == f"{m['ppl']:.4f} ± {m['ppl_error']:.4f}"
        assert row["μKLD"] == f"{m['kld_mean']:.6f} ± {m['kld_mean_error']:.6f}"
        assert row["Same top-p"] == f"{m['same_top_p']:.2f} ± {m['same_top_p_error']:.2f}%"
        assert row["𝜌PPL"] == f"{m['rho_ppl']:.2f}%"

    tasks = {r["Model"]: r for r in _section(card, "Task accuracy (%)")}
    for name, label in shown.items():
        m = by_name[name]["metrics"]
        assert tasks[label]["HellaSwag"] == f"{m['hellaswag']:.2f} ± {m['hellaswag_error']:.2f}"

    speed = _section(card, "Speed (llama-bench)")
    assert list(speed[0]) == ["Quant", "model", "size", "params", "backend", "threads", "test", "t/s"]
    for name, label in shown.items():
        rows = [r for r in speed if r["Quant"] == label]
        assert [r["test"] for r in rows] == ["pp16", "tg4"]
        assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", r["t/s"]) for r in rows)
        file = other if name.startswith("other-") else out / by_name[name]["path"]  # run files: in the run directory
        tensor_bytes = ModelInventory.load(file).tensor_bytes()  # llama-bench's "size"
        assert rows[0]["size"] == f"{tensor_bytes / 2**20:.2f} MiB"


@pytest.mark.tools
@pytest.mark.slow
def test_the_method_and_caveats_come_from_the_recipe_and_the_run(card_run):
    _, report, card, _ = card_run
    method = card.split("## Method\n", 1)[1].split("\n## ", 1)[0]
    assert "llama-imatrix (E[a²]), 8 chunks of 256 tokens of local file" in method
    assert "metric `wmse`" in method and "`knapsack`" in method and "targets 4.5bpw" in method
    assert f"recipe sha256 {report['provenance']['recipe_sha256']}" in method
    assert f"llama.cpp build {report['build']}" in method
    # the same wiki-sample.txt, split by article: what the calibration text holds of the evaluation text, measured
    o = report["overlap"]
    assert o["words"] == 13 and 0 <= o["sequences"] <= o["warn_share"] and o["sequences_checked"] > 0
    assert f"- Held out: {o['sequences']:.1%} of the evaluation text's 13-word sequences and {o['lines']:.1%}" in method
    caveats = card.split("## Caveats\n", 1)[1]
    assert "† Someone else's file" in caveats and "4 chunks of evaluation text" in caveats
    assert "labelled with the stock type whose usual size is the largest at or below its own" in caveats


@pytest.mark.tools
@pytest.mark.slow
def test_the_kept_quant_lies_beside_the_card_with_its_provenance(card_run):
    out, report, _, _ = card_run
    folder = out / "report"
    assert sorted(p.name for p in folder.glob("*.gguf")) == ["tiny-4.5bpw.gguf"]
    kept = folder / "tiny-4.5bpw.gguf"
    assert os.path.samefile(kept, out / "quant-4.5bpw-knapsack" / "model.gguf")
    recorded = gguf_layout.read(kept).fields
    assert recorded["tbpw.allocator"] == "knapsack" and recorded["tbpw.metric"] == "wmse"
    assert recorded["tbpw.recipe_sha256"] == report["provenance"]["recipe_sha256"]
    assert recorded["tbpw.imatrix_sha256"] == report["provenance"]["imatrix_sha256"]
    assert recorded["tbpw.calibration_sha256"] == report["datasets"]["calibration"]["sha256"]
    stock = gguf_layout.read(out / "stock-Q4_K_M" / "model.gguf").fields
    assert stock["tbpw.target"] == "stock Q4_K_M" and "tbpw.allocator" not in stock


@pytest.mark.tools
@pytest.mark.slow
def test_the_other_file_is_marked_in_the_report_too(card_run):
    out, report, _, other = card_run
    md = (out / "report" / "report.md").read_text()
    assert "| other-tiny-Q5_K_M †" in md and f"not made by this run: local file {other.name}" in md
    entry = next(e for e in report["entries"] if e["name"] == "other-tiny-Q5_K_M")
    assert entry["kind"] == "other" and entry["bpw"] == ModelInventory.load(other).bpw()
    assert not entry.get("selected")


@pytest.mark.tools
@pytest.mark.slow
def test_nothing_published_names_a_local_folder(card_run, wiki_text):
    """report/ is what a user uploads: its card, report, plots and GGUFs name files, never the folders they lie in."""
    out, _, _, other = card_run
    published = [p for p in (out / "report").iterdir() if p.is_file()]
    assert {p.suffix for p in published} >= {".md", ".json", ".gguf"}
    for folder in (out.parent, wiki_text.parent, other.parent, Path.home()):
        for file in published:
            assert str(folder).encode() not in file.read_bytes(), f"{file.name} names {folder}"
    kept = gguf_layout.read(out / "report" / "tiny-4.5bpw.gguf").fields
    assert kept["quantize.imatrix.file"] == "imatrix.gguf" and "/" not in kept["quantize.imatrix.dataset"]


@pytest.mark.tools
def test_a_mixed_file_is_labelled_with_the_stock_type_nearest_below_its_size(card_run):
    from tbpw.llamacpp.quantize_layout import file_type_label

    out, report, _, _ = card_run
    entry = next(e for e in report["entries"] if e["name"] == "quant-4.5bpw-knapsack")
    name, ftype = file_type_label(entry["bpw"])
    assert name == "Q4_K_S" and gguf_layout.read(out / entry["path"]).fields["general.file_type"] == ftype
    stock = gguf_layout.read(out / "stock-Q4_K_M" / "model.gguf").fields["general.file_type"]
    assert stock == 15  # llama-quantize's own: LLAMA_FTYPE_MOSTLY_Q4_K_M


@pytest.mark.tools
def test_a_gguf_of_another_model_is_refused_in_one_line(tmp_path, tiny_model, wiki_text):
    stranger = write_llama_like(tmp_path / "stranger.gguf", tiny_model, n_embd=384, n_ff=1152, n_layer=4)
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={tmp_path / 'run'}",
            f"compare_files=[{{path: {stranger}}}]"]
    result = CliRunner().invoke(main, ["run", str(RECIPE), *_sets(sets)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"error: (\S+: )?compare_files.0: stranger.gguf has \S+ of shape \[384(, \d+)?\], "
                                            r"the model \[256(, \d+)?\]: it is not a quant of this model; give a quant "
                                            r"of the run's model", lines[0]), lines
    assert not (tmp_path / "run").exists()  # refused before any work (tbpw run's checks: tbpw.run.preflight)


# ------------------------------------------------------------------------------------- without the tools


def test_same_model_means_same_architecture_tensor_names_and_shapes(tiny_model, tmp_path):
    model = ModelInventory.load(tiny_model)
    compare.check_same_model(model, model, "compare_files.0")
    fewer = ModelInventory.load(write_llama_like(tmp_path / "two.gguf", tiny_model, n_embd=256, n_ff=768, n_layer=2))
    with pytest.raises(TbpwError, match=r"two.gguf has no tensor blk.2.attn_norm.weight \(18 of the model's tensors"):
        compare.check_same_model(model, fewer, "compare_files.0")
    more = ModelInventory.load(write_llama_like(tmp_path / "six.gguf", tiny_model, n_embd=256, n_ff=768, n_layer=6))
    with pytest.raises(TbpwError, match=r"six.gguf has a tensor blk.4.\S+ the model lacks \(18 in all\)"):
        compare.check_same_model(model, more, "compare_files.0")
    other = ModelInventory.load(tiny_model)
    other.architecture = "qwen3"
    with pytest.raises(TbpwError, match=r"^compare_files.1: tiny-f16.gguf is a qwen3 model, the run's model is llama"):
        compare.check_same_model(model, other, "compare_files.1")


def test_a_hub_file_comes_from_the_hub_cache(tiny_model, tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "tiny-Q4_K_M.gguf").symlink_to(tiny_model)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ref = CompareFile(hub="someone/tiny-GGUF", file="tiny-Q4_K_M.gguf")
    assert ref.name == "other-tiny-Q4_K_M"
    found = compare.locate(ref, "compare_files.0")
    assert found.resolve() == tiny_model.resolve()
    assert compare.describe(ref) == "someone/tiny-GGUF@main tiny-Q4_K_M.gguf (Hugging Face hub)"
    missing = CompareFile(hub="someone/tiny-GGUF", file="tiny-Q2_K.gguf", label="q2")
    with pytest.raises(TbpwError, match=r"^compare_files.1: could not get tiny-Q2_K.gguf from someone/tiny-GGUF@main "
                                        r"\(\w+\): check the names and the network, or fill .*models--someone--tiny-GGUF"):
        compare.locate(missing, "compare_files.1")


def test_compare_files_are_a_path_or_a_hub_file_with_distinct_names(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="give either path, or hub and file"):
        CompareFile()
    with pytest.raises(ValidationError, match="needs `file`"):
        CompareFile(hub="a/b")
    assert CompareFile(path=tmp_path / "x-Q4_K_M.gguf", label="bartowski").name == "other-bartowski"


def test_a_recipes_compare_files_are_relative_to_it_and_must_exist(tiny_model, wiki_text, tmp_path):
    from tbpw.run import recipe as recipes

    (tmp_path / "theirs.gguf").symlink_to(tiny_model)
    text = f"{{name: file, options: {{path: {wiki_text}}}}}"
    body = (f"name: t\nmodel: {{gguf: {tiny_model}}}\ndatasets: {{calibration: {text}, evaluation: {text}}}\n"
            "targets: [{bpw: 4}]\ncompare_files:\n  - {path: theirs.gguf, label: someone}\n")
    (tmp_path / "r.yaml").write_text(body)
    loaded = recipes.load(tmp_path / "r.yaml")
    assert loaded.compare_files[0].path == tmp_path / "theirs.gguf" and loaded.compare_files[0].name == "other-someone"
    (tmp_path / "bad.yaml").write_text(body.replace("theirs.gguf", "missing.gguf"))
    with pytest.raises(TbpwError, match=rf"bad.yaml:6: compare_files.0.path: {tmp_path}/missing.gguf does not exist: "
                                        "fix the path"):
        recipes.load(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text(body + "  - {path: theirs.gguf, label: someone}\n")
    with pytest.raises(TbpwError, match="two files would both be 'other-someone' in the tables: give one a `label`"):
        recipes.load(tmp_path / "twice.yaml")
