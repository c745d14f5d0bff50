"""Recipes: validation, include/--set, and a one-line error naming the field (and line) for each kind of mistake."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.errors import TbpwError
from tbpw.run import recipe as recipes

REPO = Path(__file__).resolve().parent.parent


def _base(tiny_model: Path, wiki_text: Path) -> str:
    return textwrap.dedent(f"""\
        name: tiny
        model:
          gguf: {tiny_model}
        datasets:
          calibration: {{name: file, options: {{path: {wiki_text}, split: calibration}}}}
          evaluation: {{name: file, options: {{path: {wiki_text}, split: evaluation}}}}
        targets:
          - bpw: 4.0
        allocators:
          - {{name: knapsack}}
        """)


@pytest.fixture
def write(tmp_path: Path):
    def _write(text: str, name: str = "r.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


def test_valid_recipe_loads_with_defaults(write, tiny_model, wiki_text):
    r = recipes.load(write(_base(tiny_model, wiki_text)))
    assert r.targets[0].bpw == 4.0 and r.allocators[0].name == "knapsack"
    assert r.evaluators[0].name == "kld" and r.select.by == ["kld_mean", "rho_ppl"]
    assert r.output_dir == write("", "x").parent / "runs" / "tiny"


def test_executor_defaults_to_the_registrys_and_the_command_line_picks_another(write, tiny_model, wiki_text):
    path = write(_base(tiny_model, wiki_text))
    assert recipes.load(path).executor.name == "local"
    assert recipes.load(path, ["executor.options.workers=2"]).executor.options == {"workers": 2}
    result = CliRunner().invoke(main, ["run", str(path), "--executor", "rey"])
    assert result.exit_code == 2 and "unknown executor 'rey': did you mean 'ray'?" in result.output
    result = CliRunner().invoke(main, ["validate", str(path), "--json", "--set", "executor={name: ray}",
                                       "--set", "executor.options.cpus_per_task=2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["executor"] == {"name": "ray", "options": {"cpus_per_task": 2}}


def test_include_and_set_override(write, tiny_model, wiki_text):
    write(_base(tiny_model, wiki_text), "base.yaml")
    child = write("include: base.yaml\nname: child\nimatrix: {chunks: 4}\n", "child.yaml")
    r = recipes.load(child, ["targets=[{bpw: 3.5}, {stock: q4_k_m}]", "imatrix.ctx=256", "allocators.0.name=greedy"])
    assert r.name == "child" and r.imatrix.chunks == 4 and r.imatrix.ctx == 256
    assert [t.label for t in r.targets] == ["3.5bpw", "like-q4_k_m"] and r.allocators[0].name == "greedy"


def test_shipped_recipes_validate():
    for path in (REPO / "recipes").glob("*.yaml"):
        recipes.load(path)


BAD = [
    # (what is wrong, edit of the base recipe text, words the one-line error must contain)
    ("unknown top-level key", "targetz: []\n", ["targetz", "did you mean 'targets'"]),
    ("unknown nested key", "imatrix: {chunk: 4}\n", ["imatrix.chunk", "did you mean 'chunks'"]),
    ("wrong type", "imatrix: {ctx: many}\n", ["imatrix.ctx", "integer"]),
    ("value out of range", "imatrix: {ctx: 8}\n", ["imatrix.ctx", "greater than or equal"]),
    ("unknown allocator", "allocators: [{name: knapsak}]\n", ["allocators.0", "unknown allocator 'knapsak'", "did you mean 'knapsack'"]),
    ("unknown metric", "measure: {metric: {name: wmsee}}\n", ["measure.metric", "did you mean 'wmse'"]),
    ("unknown dataset", "datasets: {calibration: {name: fil}, evaluation: {name: file}}\n", ["datasets.calibration", "did you mean 'file'"]),
    ("unknown evaluator", "evaluators: [{name: kdl}]\n", ["evaluators.0", "did you mean 'kld'"]),
    ("bad plugin option", "allocators: [{name: knapsack, options: {bucket: 3}}]\n", ["allocators.0", "no option 'bucket'"]),
    ("missing required field", "datasets: {calibration: {name: file}}\n", ["datasets.evaluation", "required"]),
    ("target with two kinds", "targets: [{bpw: 4.0, size: 2MiB}]\n", ["targets.0", "exactly one of bpw, size, stock"]),
    ("impossible bpw", "targets: [{bpw: -1}]\n", ["targets.0.bpw", "greater than 0"]),
    ("size that is no size", "targets: [{size: lots}]\n", ["targets.0", "not a size"]),
    ("empty target list", "targets: []\n", ["targets", "at least 1"]),
    ("missing model file", "model: {gguf: /nonexistent/model.gguf}\n", ["model.gguf", "does not exist"]),
    ("two model sources", "model: {gguf: /x.gguf, hub: a/b}\n", ["model", "exactly one of hub, path, gguf, asset"]),
    ("bad run name", "name: 'a b'\n", ["name", "pattern"]),
    ("unknown selection metric", "select: {by: [kld]}\n", ["select.by.0", "kld_mean"]),
    ("unknown constraint", "constraints: {pin: {x: Q4_K}}\n", ["constraints.pin", "did you mean 'pins'"]),
    ("bad YAML", "targets: [\n", ["not valid YAML"]),
    ("calibrate without choose", "calibrate: {}\n", ["calibrate", "add `choose: {}`"]),
    ("calibration strength out of range", "calibrate: {strengths: [2]}\nchoose: {}\n", ["calibrate.strengths", "(0, 1]"]),
    ("unknown probe type", "calibrate: {probes: [Q3_X]}\nchoose: {}\n", ["calibrate.probes", "unknown probe type"]),
    ("choose with no chunks", "choose: {chunks: 0}\n", ["choose.chunks", "greater than or equal"]),
    ("unknown executor", "executor: {name: rey}\n", ["executor", "unknown executor 'rey'", "did you mean 'ray'"]),
    ("bad executor option", "executor: {options: {worker: 2}}\n", ["executor", "executor 'local' has no option 'worker'",
                                                                    "did you mean 'workers'"]),
    ("allocator listed twice", "allocators: [{name: knapsack}, {name: knapsack, options: {}}]\n",
     ["allocators", "knapsack listed more than once"]),
]


@pytest.mark.parametrize("what,edit,words", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_gives_one_line_naming_the_field(write, tiny_model, wiki_text, what, edit, words):
    path = write(_base(tiny_model, wiki_text) + edit)
    with pytest.raises(TbpwError) as info:
        recipes.load(path)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{what}: {word!r} not in {message!r}"


def test_error_names_the_line(write, tiny_model, wiki_text):
    text = _base(tiny_model, wiki_text) + "imatrix:\n  ctx: many\n"
    path = write(text)
    with pytest.raises(TbpwError) as info:
        recipes.load(path)
    line = text.splitlines().index("  ctx: many") + 1
    assert f"{path}:{line}:" in str(info.value)


def test_bad_set_override(write, tiny_model, wiki_text):
    with pytest.raises(TbpwError, match="key.path=value"):
        recipes.load(write(_base(tiny_model, wiki_text)), ["imatrix.ctx"])


def test_cli_validate_and_schema(write, tiny_model, wiki_text):
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(write(_base(tiny_model, wiki_text)))])
    assert ok.exit_code == 0 and "ok (1 targets x 1 allocators" in ok.output
    bad = runner.invoke(main, ["validate", str(write(_base(tiny_model, wiki_text) + "targetz: 1\n", "bad.yaml"))])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "did you mean 'targets'" in bad.output
    schema = json.loads(runner.invoke(main, ["schema"]).output)
    assert "targets" in schema["properties"]
    assert "max_buckets" in schema["x-tbpw-plugins"]["allocator"]["knapsack"]["properties"]
    assert "mean_term" in schema["x-tbpw-plugins"]["metric"]["fork"]["properties"]
