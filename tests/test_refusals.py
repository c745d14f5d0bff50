"""`tbpw validate` is the complete preflight: every refusal a run can make after it has started is either checked
before its first stage (its twin, in tbpw.run.recipe or tbpw.run.preflight, exercised by tests/test_recipe.py's
`test_validate_rejects_what_run_rejects_before_its_first_stage`) or listed here with the reason no preflight can know
it. A new refusal in a stage, the pipeline or the scheduler fails this test until it is given one or the other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WHERE = [*sorted((REPO / "tbpw" / "stages").glob("*.py")),
         *(REPO / "tbpw" / "run" / name for name in ("pipeline.py", "graph.py", "execute.py"))]

# the start of each refusal's message -> ("twin", the preflight check) or ("why not", the reason)
REFUSALS: dict[str, tuple[str, str]] = {
    # compare_files
    "{where}: {path} does not exist": ("twin", "recipe._check_files (compare_files.N.path)"),
    "{where}: a hub file needs huggingface_hub": ("twin", "preflight._source_problems"),
    "{where}: could not get": ("why not", "whether a download succeeds is known only by trying it"),
    "{where}: {name} is a": ("twin", "preflight._compare_problems (a local file; a hub file once it is fetched)"),
    "{where}: {name} has no tensor": ("twin", "preflight._compare_problems"),
    "{where}: {name} has a tensor": ("twin", "preflight._compare_problems"),
    "{where}: {name} has {tensor.name} of shape": ("twin", "preflight._compare_problems"),
    # the model
    "F16 would clip this model's weights": ("why not", "every weight must be read: a pass over the whole model, "
                                            "which the conversion itself makes"),
    "model.hub needs huggingface_hub": ("twin", "preflight._source_problems"),
    "could not download": ("why not", "whether a download succeeds is known only by trying it"),
    # the run directory
    "{self.root} is not a tbpw run directory on this node": ("why not", "what a worker node sees of shared storage is "
                                                             "known only on that node"),
    "{problem}": ("twin", "preflight._output_problems (ownership_problem)"),
    "stage name {stage!r} is not a plain name": ("twin", "recipe.PLAIN_NAME (the recipe's name, dataset roles, "
                                                 "compare_files labels)"),
    "{path} is no output of a finished stage": ("why not", "tbpw's own use of the run directory, no user input"),
    "stage {stage} needs {path}, which was deleted": ("why not", "it depends on what an earlier run deleted "
                                                      "(keep: chosen) and on inputs changed since"),
    # the graph and the scheduler
    "two tasks are named": ("twin", "preflight._duplicate_targets (targets of one name)"),
    "task {name!r} needs {dep!r}": ("why not", "the pipeline's own declaration, no user input"),
    "a pipeline made only to plan runs no stage": ("why not", "tbpw's own use of a planning pipeline"),
    "the task graph cannot go on": ("why not", "the pipeline's own declaration, no user input"),
    "an executor reported": ("why not", "an executor plugin's bug"),
}
# What llama.cpp's tools refuse during a run, and where a recipe is stopped before them.
TOOL_REFUSALS: dict[str, str] = {
    "llama-imatrix/llama-perplexity: you need at least 2 x ctx tokens": "preflight._text_problems",
    "any tool: failed to init (a context far beyond the model's)": "preflight._context_problems",
    "any tool: std::stoi out of range (a count over 2^31 - 1)": "tbpw.options.TOOL_INT bounds of the options models",
    "llama-quantize F16/BF16/F32/COPY: no quantization to compare at that size": "preflight.NOT_QUANTIZATIONS",
}


def _template(node: ast.expr) -> str:
    """A message as written: its literal parts, and {the expressions} of an f-string."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(str(v.value) if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + (
            "!r" if v.conversion == ord("r") else "") + "}" for v in node.values)
    return "{" + ast.unparse(node) + "}"


def _refusals() -> list[tuple[str, str]]:
    found = []
    for path in WHERE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "TbpwError" and node.args:
                message = node.args[0]
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", _template(message)))
    return found


def test_every_refusal_after_the_start_has_a_twin_or_a_reason():
    found = _refusals()
    assert len(found) >= 15  # the walk sees the stages' refusals
    unknown = [f"{where}: {message[:80]!r}" for where, message in found
               if not any(message.startswith(start) for start in REFUSALS)]
    assert unknown == [], "give each a validate twin or a reason in REFUSALS"
    stale = [start for start in REFUSALS if not any(message.startswith(start) for _, message in found)]
    assert stale == [], "REFUSALS lists refusals no stage makes any more"


@pytest.mark.parametrize("start", sorted(REFUSALS))
def test_each_twin_names_a_check_that_exists(start):
    kind, what = REFUSALS[start]
    assert kind in ("twin", "why not") and what
    if kind == "twin":
        module, _, name = what.split(" ")[0].partition(".")
        source = (REPO / "tbpw" / "run" / f"{module}.py").read_text(encoding="utf-8")
        assert f"def {name.split('(')[0]}" in source or name.split("(")[0] in source, what


def test_each_tool_refusal_has_its_twin():
    preflight = (REPO / "tbpw" / "run" / "preflight.py").read_text(encoding="utf-8")
    for refusal, twin in TOOL_REFUSALS.items():
        name = twin.split(".")[-1].split(" ")[0]
        assert name in preflight or (REPO / "tbpw" / "options.py").read_text(encoding="utf-8").count(name), refusal
