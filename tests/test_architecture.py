"""The shape of the code: imports point one way (down a declared order of floors, TYPE_CHECKING imports included),
the core names no plugin, plugins use only the public API, the packaging lists what the tree holds, and starting
the command line stays light."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import tbpw

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "tbpw"
PLUGINS = REPO / "plugins"


def _module_name(path: Path) -> str:
    if path.is_relative_to(PLUGINS):
        parts = ["tbpw_plugins", *path.relative_to(PLUGINS).with_suffix("").parts]
    else:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for root in (CORE, PLUGINS) for p in root.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports anywhere: top level, in functions, under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a module's own packages are imported before it anyway: an edge to them is no dependency
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(path, name, known) for name, path in sources.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


# The floors of the core, bottom first: a module imports its own package and the floors below it, never one above
# (the facade `tbpw`, at the top, re-exports from every floor; plugins import only the facade). The contracts sit
# low enough for their users: `Target` in model, the executor's jobs in tbpw.jobs, the options base in tbpw.options;
# the plugin base classes sit above the types they name, and the floors below them are handed plugin instances.
FLOORS = (
    "tbpw.version",
    "tbpw.errors",
    "tbpw.options",  # the options base and plugin references every stage's options model builds on
    "tbpw.files",
    "tbpw.model",  # GGUF layout, inventory, ggml type facts, targets and budgets
    "tbpw.imatrix",
    "tbpw.llamacpp",  # the one package that touches llama.cpp
    "tbpw.quantize",  # the tensor store
    "tbpw.jobs",  # what an executor receives
    "tbpw.data",
    "tbpw.evaluate",
    "tbpw.measure",
    "tbpw.allocate",
    "tbpw.plugin",  # the plugin contracts and registry
    "tbpw.select",
    "tbpw.stages",  # one module per stage: options, step, cost
    "tbpw.run",  # recipes, the pipeline's wiring, the report
    "tbpw.cli",
    "tbpw.testing",
    "tbpw",
)


def _floor(module: str) -> int:
    """The floor of a core module: its longest matching entry of FLOORS."""
    matches = [i for i, name in enumerate(FLOORS) if module == name or module.startswith(name + ".")]
    return max(matches, key=lambda i: len(FLOORS[i]))


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a core module from a higher floor than its own."""
    core = [m for m in graph if m == "tbpw" or m.startswith("tbpw.")]
    return sorted(f"{m} -> {t}" for m in core for t in graph[m]
                  if (t == "tbpw" or t.startswith("tbpw.")) and _floor(t) > _floor(m))


def test_every_core_package_has_a_floor():
    packages = {".".join(m.split(".")[:2]) for m in _sources() if m.startswith("tbpw.")}
    assert packages <= set(FLOORS), sorted(packages - set(FLOORS))


def test_no_import_points_up_the_floors():
    assert _upward(_graph()) == []


def test_the_floor_check_finds_a_wrong_way_import():
    assert _upward({"tbpw.measure.engine": {"tbpw.plugin.manager", "tbpw.model.inventory"},
                    "tbpw.llamacpp.quantize": {"tbpw.allocate.budget"}}) == [
        "tbpw.llamacpp.quantize -> tbpw.allocate.budget", "tbpw.measure.engine -> tbpw.plugin.manager"]


def test_no_import_cycle_anywhere_in_the_core_or_the_plugins():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_names_a_built_in_plugin():
    """Defaults live in recipes and the plugin registry; the stages know no allocator, metric or evaluator."""
    pattern = re.compile(r"knapsack|lagrangian|wmse|hellaswag")
    offenders = [f"{p.relative_to(REPO)}:{i}" for sub in ("allocate", "measure", "select", "run")
                 for p in (CORE / sub).rglob("*.py")
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_the_product_cites_nothing_outside_the_repository():
    """../shared/ holds the project's notes and fixtures, not part of what a user installs."""
    offenders = [str(p.relative_to(REPO)) for root in (CORE, PLUGINS) for p in root.rglob("*.py")
                 if "../shared" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_plugins_and_examples_import_only_the_public_api():
    offenders = []
    for root in (PLUGINS, REPO / "examples"):
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith("tbpw.")]
    assert offenders == []


def test_every_public_name_resolves():
    for name in tbpw.__all__:
        assert getattr(tbpw, name) is not None, name
    with pytest.raises(AttributeError):
        tbpw.no_such_name  # noqa: B018


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_entry_points_and_plugin_subpackages_agree():
    entry_points = _pyproject()["project"]["entry-points"]["tbpw"]
    subpackages = sorted(p.parent.name for p in PLUGINS.glob("*/__init__.py"))
    assert sorted(entry_points) == subpackages
    assert entry_points == {name: f"tbpw_plugins.{name}" for name in subpackages}


def test_the_package_list_is_the_tree():
    setuptools = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {_module_name(p) for root in (CORE, PLUGINS) for p in root.rglob("__init__.py")}
    # vendor/ is data: every folder of it is listed, so that its files install (tbpw_vendor.native, ...)
    vendor = REPO / "vendor"
    on_disk |= {".".join(["tbpw_vendor", *d.relative_to(vendor).parts]) for d in [vendor, *vendor.rglob("*")]
                if d.is_dir() and any(f.is_file() for f in d.iterdir())}
    assert listed == on_disk
    assert setuptools["package-dir"] == {"tbpw": "tbpw", "tbpw_plugins": "plugins", "tbpw_vendor": "vendor"}


def _loaded_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO).stdout
    return set(out.split())


def test_importing_the_cli_loads_no_plugin():
    loaded = _loaded_after("import tbpw.cli")
    assert not {m for m in loaded if m.startswith("tbpw_plugins")}
    assert "numpy" not in loaded


def test_help_lists_every_command_without_numpy():
    loaded = _loaded_after("from tbpw.cli import main\n"
                           "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert "numpy" not in loaded and "gguf" not in loaded
    assert "tbpw_plugins.allocators" in loaded  # the plugins were asked for their commands
