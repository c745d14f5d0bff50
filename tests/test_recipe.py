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
    ("unknown probe type", "calibrate: {probes: [Q3_X]}\nchoose: {}\n", ["calibrate.probes", "'Q3_X' (probe 0) is not a ggml type"]),
    ("choose with no chunks", "choose: {chunks: 0}\n", ["choose.chunks", "greater than or equal"]),
    ("unknown executor", "executor: {name: rey}\n", ["executor", "unknown executor 'rey'", "did you mean 'ray'"]),
    ("bad executor option", "executor: {options: {worker: 2}}\n", ["executor", "executor 'local' has no option 'worker'",
                                                                    "did you mean 'workers'"]),
    ("screening on one chunk", "choose: {screen_chunks: 1}\n", ["choose", "at least 2: the tie rule"]),
    ("no finalist", "choose: {finalists: 0}\n", ["choose.finalists", "greater than or equal"]),
    ("unknown calibration background", "calibrate: {background: Q9_9}\nchoose: {}\n",
     ["calibrate.background", "unknown background type"]),
    ("store that is no switch", "store: sometimes\n", ["store", "bool"]),
    ("allocator listed twice", "allocators: [{name: knapsack}, {name: knapsack, options: {}}]\n",
     ["allocators", "knapsack listed more than once"]),
    # a recipe name is a plain name: it names the run's folder
    ("run name that climbs out", "name: '..'\n", ["name", "pattern"]),
    ("hidden run name", "name: .tiny\n", ["name", "pattern"]),
    ("run name with a path", "name: a/b\n", ["name", "pattern"]),
    ("dataset role that is a path", "datasets: {'../x': {name: file, options: {path: WIKI}}}\n",
     ["datasets", "'../x' is not a plain name"]),
    ("include of a number", "include: 5\n", ["include", "give a recipe file name"]),
    ("include list holding a number", "include: [5]\n", ["include", "give a recipe file name"]),
    ("package option that would add lines to pip's requirements",
     "datasets: {calibration: {name: package, options: {package: exllamav2, version: \"0.3.2\\n-r /etc/passwd\", "
     "sha256: 7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e, path: a.txt}}, "
     "evaluation: {name: file, options: {path: WIKI}}}\n", ["datasets.calibration", "version"]),
]

# Mistakes only the build, the model or the disk reveal: `tbpw validate` finds them before `tbpw run` starts
# (OUT is a folder holding a user's file, MODEL the tiny model, WIKI its text).
PREFLIGHT_BAD = [
    ("unknown stock type", "compare_stock: [Q4_X]\n", ["compare_stock.0", "'Q4_X' is not a type this build"]),
    ("unknown stock target", "targets: [{stock: Q9_K_M}]\n", ["targets.0.stock", "not a type this build"]),
    ("bpw above what the model can reach", "targets: [{bpw: 30}]\n", ["targets.0 (30bpw)", "give a target from"]),
    ("size below what the model can reach", "targets: [{size: 1k}]\n", ["targets.0 (1k)", "give a size from"]),
    ("duplicate targets", "targets: [{bpw: 4}, {bpw: 4.0}]\n", ["targets.1 (4bpw) repeats targets.0"]),
    ("near-duplicate targets", "targets: [{bpw: 4}, {bpw: 4.0001}]\n",
     ["targets.1 (4.0001bpw)", "smallest type step"]),
    ("pin that matches no tensor", "constraints: {pins: {'^blk\\.9\\.': Q4_K}}\n",
     ["constraints.pins", "matches no tensor of tiny-f16.gguf"]),
    ("role rule that matches no role", "constraints: {min_bpw: {attn_x: 4}}\n",
     ["constraints.min_bpw['attn_x'] matches no role"]),
    ("pin that is no regex", "constraints: {pins: {'blk(': Q4_K}}\n", ["constraints.pins", "not a regular expression"]),
    ("pin to no type", "constraints: {pins: {attn_v: Q4_X}}\n", ["constraints.pins", "'Q4_X' is not a ggml type"]),
    ("float probe type", "calibrate: {probes: [Q3_K, F16]}\nchoose: {}\n", ["calibrate.probes", "F16 (probe 1) is a "
                                                                         "float type"]),
    ("unknown candidate type", "measure: {candidates: [Q4_K, Q4_X]}\n", ["measure.candidates", "unknown ggml type"]),
    ("missing dataset file", "datasets: {calibration: {name: file, options: {path: /nonexistent/cal.txt}}, "
     "evaluation: {name: file, options: {path: WIKI}}}\n", ["datasets.calibration", "does not exist"]),
    ("dataset folder where a file belongs", "datasets: {calibration: {name: file, options: {path: OUT}}, "
     "evaluation: {name: file, options: {path: WIKI}}}\n", ["datasets.calibration", "is a folder"]),
    ("task file of the wrong kind", "evaluators: [{name: kld}, {name: hellaswag}]\ndatasets: {calibration: {name: file, "
     "options: {path: WIKI}}, evaluation: {name: file, options: {path: WIKI}}, hellaswag: {name: file, options: "
     "{path: WIKI, kind: hellaswag}}}\n", ["datasets.hellaswag", "HellaSwag file"]),
    ("output_dir holding a user's files", "output_dir: OUT\n", ["output_dir", "holds files tbpw did not make (model)"]),
    ("output_dir that is a file", "output_dir: WIKI\n", ["output_dir", "is a file, not a folder"]),
    ("output_dir inside a file", "output_dir: WIKI/run\n", ["cannot create output_dir", "is not a writable folder"]),
    ("model folder that is no Hugging Face model", "model: {path: OUT}\n", ["model.path", "(no config.json)"]),
    ("stock type that is no quantization", "compare_stock: [F16]\n", ["compare_stock.0", "F16 is not a quantization"]),
    ("target at the size of a copy", "targets: [{stock: COPY}]\n", ["targets.0.stock", "COPY is not a quantization"]),
    ("context beyond the model's", "imatrix: {ctx: 1000000000}\n",
     ["imatrix.ctx: 1000000000 tokens is more than the 512 the model was trained for"]),
    ("chunks no tool can read", "imatrix: {chunks: 1000000000000}\n", ["imatrix.chunks", "2147483647"]),
    ("calibration text shorter than two contexts", "datasets: {calibration: {name: file, options: {path: WIKI, "
     "take_tokens: 100}}, evaluation: {name: file, options: {path: WIKI}}}\n",
     ["imatrix.ctx: the calibration text has", "tokens two contexts of 512 need"]),
    ("evaluation text shorter than two contexts", "datasets: {calibration: {name: file, options: {path: WIKI}}, "
     "evaluation: {name: file, options: {path: WIKI, take_tokens: 100}}}\n",
     ["evaluation.ctx: the evaluation text has"]),
    ("targets that would share a name", "targets: [{bpw: 3.5}, {bpw: 3.5000001}]\n",
     ["targets.1 (3.5bpw) has the name of targets.0"]),
    ("target that is not a number", "targets: [{bpw: .nan}]\n", ["targets.0.bpw", "finite number"]),
]


def _edited(base: str, edit: str, wiki_text: Path, out: Path) -> str:
    """The base recipe with the edit's top-level fields in place of its own (a field written twice is a mistake
    of its own)."""
    edit = edit.replace("WIKI", str(wiki_text)).replace("OUT", str(out))
    keys = {line.split(":", 1)[0] for line in edit.splitlines() if line and not line[0].isspace()}
    kept, skipping = [], False
    for line in base.splitlines(keepends=True):
        if line and not line[0].isspace():
            skipping = line.split(":", 1)[0] in keys
        if not skipping:
            kept.append(line)
    return "".join(kept) + edit


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """A folder of a user's: a model folder inside, which no run may replace."""
    folder = tmp_path / "mine"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("what,edit,words", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_gives_one_line_naming_the_field(write, tiny_model, wiki_text, user_folder, what, edit, words):
    path = write(_edited(_base(tiny_model, wiki_text), edit, wiki_text, user_folder))
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


@pytest.mark.tools  # a recipe is valid only with a build to run it (validate reports a missing one)
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


def _validate_and_run(recipe: Path) -> tuple:
    runner = CliRunner()
    return runner.invoke(main, ["validate", str(recipe)]), runner.invoke(main, ["run", str(recipe)])


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.tools
@pytest.mark.parametrize("what,edit,words", BAD + PREFLIGHT_BAD, ids=[b[0] for b in BAD + PREFLIGHT_BAD])
def test_validate_rejects_what_run_rejects_before_its_first_stage(write, tiny_model, wiki_text, user_folder, what,
                                                                  edit, words):
    recipe = write(_edited(_base(tiny_model, wiki_text), edit, wiki_text, user_folder))
    before = sorted(p.relative_to(user_folder) for p in user_folder.rglob("*"))
    validated, ran = _validate_and_run(recipe)
    assert validated.exit_code == 2 and ran.exit_code == 2, (validated.output, ran.output)
    assert _errors(validated) == _errors(ran) and _errors(validated), ran.output
    first = _errors(validated)[0]
    for word in words:
        assert word in first, f"{what}: {word!r} not in {first!r}"
    assert "Traceback" not in validated.output + ran.output
    assert not (recipe.parent / "runs").exists()  # the run started nothing
    assert sorted(p.relative_to(user_folder) for p in user_folder.rglob("*")) == before
    assert (user_folder / "model" / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.tools
def test_every_mistake_of_a_recipe_is_reported_on_its_own_line(write, tiny_model, wiki_text, user_folder):
    text = _base(tiny_model, wiki_text).replace("name: tiny", "name: '..'") + (
        "targetz: []\n"                                  # a typo of a field
        "imatrix: {ctx: 8}\n"                            # out of range
        "evaluators: [{name: kdl}]\n"                    # an unknown plugin
        "compare_stock: [Q4_X]\n"                        # a type the build does not write
        f"output_dir: {user_folder}\n")                  # a folder of the user's
    validated, ran = _validate_and_run(write(text))
    lines = _errors(validated)
    assert validated.exit_code == 2 and lines == _errors(ran)
    assert len(lines) == 6, lines
    for expected in ("field 'name'", "unknown field 'targetz'", "imatrix.ctx", "did you mean 'kld'",
                     "compare_stock.0", f"output_dir {user_folder} holds files tbpw did not make"):
        assert sum(expected in line for line in lines) == 1, (expected, lines)
    assert validated.stderr.count("\n") == 6


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: café\n".encode("latin-1"))
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == f"error: {recipe}: not UTF-8 text (byte 0xe9 at offset 9): save the recipe as UTF-8\n"


def test_a_folder_given_as_an_included_recipe_is_one_line(write, tmp_path):
    (tmp_path / "base").mkdir()
    result = CliRunner().invoke(main, ["validate", str(write("include: base\nname: x\n"))])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "base is a folder: give the recipe's YAML file" in result.stderr


@pytest.mark.tools
def test_an_output_disk_without_room_for_the_run_is_refused(write, tiny_model, wiki_text, tmp_path, monkeypatch):
    from tbpw.run import preflight

    real = preflight.shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 20))
    recipe = write(_base(tiny_model, wiki_text) + f"output_dir: {tmp_path / 'out'}\nevaluation: {{chunks: 4}}\n")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"error: {recipe}: output_dir {tmp_path / 'out'}: the run writes at least" in result.stderr
    assert "and its disk has 1.000 MiB (1048576 bytes) free: free space or choose another output_dir" in result.stderr
