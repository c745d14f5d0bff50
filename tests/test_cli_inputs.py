"""The command line's inputs are checked as a recipe's are: each mistake is one `error:` line (exit 2) that names
the cause and the fix, with the recipe's own words where a recipe can make the same mistake, found before any
work, never a traceback."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.errors import TbpwError
from tbpw.measure.table import CandidateError, ErrorTable, TensorErrors

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"
MODEL_NAME = "tiny-f16.gguf"


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, TypeError)), result.output
    return result


def _one_error(result) -> str:
    """The single `error:` line a refused command prints (exit status 2)."""
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0].removeprefix("error: ")


def _sets(tiny_model: Path, wiki_text: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}", *extra]
    return [arg for s in sets for arg in ("--set", s)]


# ----- error tables: one reader, and what it refuses -----


def _damaged(table: ErrorTable, how: str) -> tuple[dict, str, str]:
    """The table's JSON with one entry spoiled `how`; the tensor and the candidate the refusal must name."""
    data = copy.deepcopy(table.to_json())
    tensor = data["tensors"][1]
    candidate = tensor["candidates"][0]
    if how == "unknown type":
        candidate["type"] = "Q9_Z"
    elif how == "tensor twice":
        data["tensors"].append(copy.deepcopy(tensor))
        return data, tensor["name"], ""
    else:
        candidate["error"] = {"negative": -0.5, "nan": float("nan"), "inf": float("inf")}[how]
    return data, tensor["name"], candidate["type"]


@pytest.mark.parametrize("how", ["unknown type", "negative", "nan", "inf", "tensor twice"])
def test_an_error_table_entry_no_allocator_can_use_is_refused_naming_table_tensor_and_candidate(
        fork_error_table, tmp_path, how):
    data, tensor, candidate = _damaged(fork_error_table, how)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TbpwError) as refused:
        ErrorTable.read_json(path)
    message = str(refused.value)
    assert message.startswith(f"error table {path}: tensor {tensor}") and candidate in message
    assert "\n" not in message and "measure again" in message


def test_tbpw_never_writes_a_table_it_would_refuse_to_read(tmp_path):
    table = ErrorTable([TensorErrors("blk.0.attn_q.weight", 65536, [CandidateError("Q4_K", 36864, float("inf"))])],
                       {"metric": "wmse"})
    with pytest.raises(TbpwError, match=r"not written: tensor blk\.0\.attn_q\.weight, candidate Q4_K: the error inf "
                                        r"is not a finite number >= 0 \(metric wmse\)"):
        table.write_json(tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


@pytest.fixture
def bad_table(fork_error_table, tmp_path) -> tuple[Path, str]:
    data, tensor, _ = _damaged(fork_error_table, "unknown type")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path, tensor


@pytest.mark.tools
@pytest.mark.parametrize("command", ["quantize", "choose", "calibrate"])
def test_every_command_that_reads_an_error_table_refuses_an_unknown_type_in_one_line(
        command, tiny_model, stock_imatrix, split_text, bad_table, tmp_path):
    path, tensor = bad_table
    common = [tiny_model, "--imatrix", stock_imatrix, "--error-table", path]
    args = {"quantize": ["quantize", *common, "--target-bpw", 4, "--dry-run"],
            "choose": ["choose", *common, "--target-bpw", 4, "-f", split_text[0], "-o", tmp_path / "c.gguf"],
            "calibrate": ["calibrate", *common, "-f", split_text[0], "-o", tmp_path / "c.json"]}[command]
    assert _one_error(_invoke(args)) == (
        f"error table {path}: tensor {tensor}, candidate 'Q9_Z': not a ggml type (names such as Q4_K, IQ3_S, Q8_0, "
        "BF16): fix that entry, or measure again with `tbpw measure --out`")


@pytest.mark.tools
def test_a_metric_that_gives_a_negative_error_stops_the_measurement_naming_it(tiny_model, tmp_path, plugin_manager):
    from tbpw import ErrorMetric, hookimpl

    class Negative(ErrorMetric):
        name = "negative"

        def slice_error(self, original, reconstructed, stats, context):
            return -1.0

    class Plugin:
        @hookimpl
        def tbpw_register_metrics(self, register):
            register(Negative)

    plugin_manager.register(Plugin(), name="test-negative-metric")
    cache = tmp_path / "cache"
    line = _one_error(_invoke(["measure", tiny_model, "--metric", "negative", "--types", "Q8_0", "--cache-dir", cache,
                               "-q"]))
    assert "not written: tensor " in line and "candidate Q8_0: the error -1.0 is not a finite number >= 0" in line
    assert "(metric negative)" in line
    assert not list(cache.rglob("table.json"))  # no cache entry that every later read would refuse


# ----- constraints: the recipe's checks, before any measuring -----


@pytest.mark.parametrize("command", ["quantize", "choose"])
def test_a_constraints_file_of_the_wrong_shape_is_one_line(command, tiny_model, stock_imatrix, fork_error_table,
                                                           split_text, tmp_path):
    constraints = tmp_path / "c.yaml"
    constraints.write_text("pins: [1, 2]\n")
    table = tmp_path / "t.json"
    fork_error_table.write_json(table)
    args = [command, tiny_model, "--imatrix", stock_imatrix, "--target-bpw", 4, "--error-table", table,
            "--constraints", constraints, "-o", tmp_path / "out.gguf"]
    if command == "choose":
        args += ["-f", split_text[0]]
    assert _one_error(_invoke(args)) == (f"constraints file {constraints}: constraint 'pins': Input should be a valid "
                                         "dictionary; constraints are: pins, allowed_types, min_bpw, max_bpw, share_type")


@pytest.mark.tools
def test_a_constraint_that_matches_nothing_is_refused_as_the_recipe_refuses_it(tiny_model, stock_imatrix, wiki_text,
                                                                               tmp_path):
    constraints = tmp_path / "c.yaml"
    constraints.write_text("allowed_types: {'nothing_.*': [Q4_K]}\n")
    cache = tmp_path / "cache"
    line = _one_error(_invoke(["quantize", tiny_model, "--imatrix", stock_imatrix, "--target-bpw", 4, "--dry-run",
                               "--constraints", constraints, "--cache-dir", cache]))
    rule = (f"constraints.allowed_types['nothing_.*'] matches no role of {MODEL_NAME} (its roles: attn_k, attn_output, "
            "attn_q, attn_v, ffn_down, ffn_gate, ffn_up, token_embd): check the pattern")
    assert line == f"{constraints}: {rule}"
    assert not cache.exists()  # refused before anything was measured
    validated = _invoke(["validate", RECIPE, *_sets(tiny_model, wiki_text, tmp_path / "run",
                                                    "constraints={allowed_types: {'nothing_.*': [Q4_K]}}")])
    assert f"error: {RECIPE}: {rule}" in validated.output.splitlines()  # the very words of the recipe's check


def test_a_pin_flag_is_checked_like_a_recipe_pin(tiny_model, stock_imatrix, fork_error_table, tmp_path):
    table = tmp_path / "t.json"
    fork_error_table.write_json(table)
    base = ["quantize", tiny_model, "--imatrix", stock_imatrix, "--target-bpw", 4, "--error-table", table, "--dry-run"]
    assert _one_error(_invoke([*base, "--pin", "zzz=Q4_K"])) == (
        f"--pin: constraints.pins['zzz'] matches no tensor of {MODEL_NAME}: check the pattern")
    assert _one_error(_invoke([*base, "--pin", "output=Q9_Z"])) == (
        "--pin: constraints.pins['output']: 'Q9_Z' is not a ggml type; use names such as Q4_K, IQ3_S, Q8_0, BF16")


# ----- flags whose checks are an options model's -----


def test_an_unknown_probe_type_names_the_flag_given(tiny_model, stock_imatrix, fork_error_table, split_text, tmp_path):
    table = tmp_path / "t.json"
    fork_error_table.write_json(table)
    line = _one_error(_invoke(["calibrate", tiny_model, "--imatrix", stock_imatrix, "--error-table", table,
                               "-f", split_text[0], "--probe", "Q9_Z", "-o", tmp_path / "c.json"]))
    assert line == ("tbpw calibrate: --probe: 'Q9_Z' (probe 0) is not a ggml type: use type names such as Q3_K or "
                    "IQ4_XS")
    # a float type is refused before any work, in the recipe's words
    line = _one_error(_invoke(["calibrate", tiny_model, "--imatrix", stock_imatrix, "--error-table", table,
                               "-f", split_text[0], "--probe", "Q3_K", "--probe", "F16", "-o", tmp_path / "c.json"]))
    assert line.startswith("tbpw calibrate: --probe: F16 (probe 1) is a float type") and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("flags,named", [(["--sample-scale", "0"], "--sample-scale: Input should be greater than 0"),
                                         (["--types", "Q4_K,Q9_X"], "--types: unknown ggml type 'Q9_X'")])
def test_measure_names_the_flag_given_not_the_field_behind_it(tiny_model, flags, named):
    assert _one_error(_invoke(["measure", tiny_model, *flags])).startswith(f"tbpw measure: {named}")


@pytest.mark.parametrize("threads", ["0", "-2"])
@pytest.mark.parametrize("command", ["measure", "quantize", "calibrate", "choose", "imatrix make"])
def test_every_threads_flag_is_at_least_one_as_a_recipe_s_is(command, threads, tiny_model, stock_imatrix, wiki_text,
                                                             tmp_path):
    from tbpw.run.recipe import read

    inputs = {"measure": [],
              "quantize": ["--imatrix", stock_imatrix, "--target-bpw", 4, "--dry-run"],
              "calibrate": ["--imatrix", stock_imatrix, "--error-table", tmp_path / "t.json", "-f", wiki_text,
                            "-o", tmp_path / "c.json"],
              "choose": ["--imatrix", stock_imatrix, "--target-bpw", 4, "--error-table", tmp_path / "t.json",
                         "-f", wiki_text, "-o", tmp_path / "c.gguf"],
              "imatrix make": ["-f", wiki_text, "-o", tmp_path / "i.gguf"]}[command]
    line = _one_error(_invoke([*command.split(), tiny_model, *inputs, "-t", threads]))
    assert line == f"tbpw {command}: --threads: Input should be greater than or equal to 1"
    _, problems = read(RECIPE, [f"model.gguf={tiny_model}", f"measure.threads={threads}"])
    assert any(p.endswith("'measure.threads': Input should be greater than or equal to 1") for p in problems), problems


# ----- inspect: what is there instead of a GGUF -----


def test_inspect_says_what_the_file_is_when_it_is_no_gguf(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    empty, text = tmp_path / "empty.gguf", tmp_path / "notes.txt"
    empty.write_bytes(b"")
    text.write_text("not a model\n")
    assert _one_error(_invoke(["inspect", "/dev/null"])) == (
        "model file /dev/null is a character device, not a regular file: give a file")
    assert _one_error(_invoke(["inspect", pipe])) == f"model file {pipe} is a named pipe, not a regular file: give a file"
    assert _one_error(_invoke(["inspect", empty])) == f"{empty} is empty, not a GGUF file: give a .gguf model"
    assert "is not a GGUF file" in _one_error(_invoke(["inspect", text]))
    assert _one_error(_invoke(["inspect", tmp_path / "absent.gguf"])).endswith("does not exist: check the path")


# ----- tbpw run --force: only names of the run's stages -----


@pytest.mark.tools
def test_run_refuses_a_force_that_names_no_stage(tiny_model, wiki_text, tmp_path):
    out = tmp_path / "run"
    args = ["run", RECIPE, *_sets(tiny_model, wiki_text, out)]
    for extra in ([], ["--plan"]):
        line = _one_error(_invoke([*args, "--force", "measur", *extra]))
        assert line.startswith("--force measur names no stage of this run (did you mean 'measure'?): give a stage "
                               "(model, data-calibration, ")
        assert line.endswith("or the start of several (data, stock, quant, eval, bench)")
        assert not out.exists()  # refused before the run directory is made
    planned = _invoke([*args, "--force", "eval", "--force", "quant-3.5bpw", "--force", "measure", "--plan"])
    assert planned.exit_code == 0, planned.output


# ----- datasets: a number where a version is text -----


def test_a_package_version_given_as_a_number_is_its_text(tmp_path):
    sha = "ab" * 32
    result = _invoke(["data", "get", "package", "-o", "package=foo", "-o", "version=2", "-o", f"sha256={sha}",
                      "-o", "path=a.txt", "--offline", "--cache-dir", tmp_path])
    assert result.exit_code == 2 and "foo==2 is not in the download cache" in result.output, result.output


def test_revisions_and_seeds_given_as_numbers_are_their_text():
    from tbpw.plugin.manager import get_manager

    datasets = get_manager().datasets()
    assert datasets.create("wikitext-2", {"revision": 2, "split_seed": 42}).options.revision == "2"
    assert datasets.create("file", {"path": "x.txt", "split_seed": 42}).options.split_seed == "42"
    assert datasets.create("package", {"package": "foo", "version": 0.3, "sha256": "ab" * 32,
                                       "path": "a.txt"}).options.version == "0.3"
