"""The example third-party allocator (examples/tbpw-cheapest-allocator): registered or installed, it is
selected by name and its plan is applied and verified like a built-in's."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from click.testing import CliRunner
from instances import allocate

from tbpw.allocate.problem import build_problem
from tbpw.errors import TbpwError
from tbpw.measure import forkstate
from tbpw.model.budget import Target
from tbpw.model.inventory import ModelInventory

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tbpw-cheapest-allocator"


@pytest.fixture
def cheapest_module(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    module = importlib.import_module("tbpw_cheapest_allocator")
    yield module
    sys.modules.pop("tbpw_cheapest_allocator", None)


@pytest.fixture
def registered(plugin_manager, cheapest_module):
    name = plugin_manager.register(cheapest_module, name="cheapest-example")
    yield plugin_manager
    plugin_manager.unregister(name)


def test_registered_plugin_is_selectable_and_validated(registered, tiny_model, fork_tiny_dir):
    assert "cheapest" in registered.allocators().names()
    inventory = ModelInventory.load(tiny_model)
    table = forkstate.read(fork_tiny_dir / "tiny.bpw_state")
    problem = build_problem(inventory, table, Target(bpw=3.0))
    plain = allocate(inventory, problem, "cheapest")
    assert plain.allocator == "cheapest"
    assert all(t.type == min(u.candidates, key=lambda c: c.bytes).type
               for u in problem.tensors for t in plain.tensors if t.name == u.name)
    spent = allocate(inventory, problem, "cheapest", {"spend_on": ["attn_v"]})
    assert spent.achieved_bpw > plain.achieved_bpw and spent.achieved_bpw <= 3.0
    assert spent.allocator_options == {"spend_on": ["attn_v"]}
    with pytest.raises(TbpwError, match=r"has no option 'spend_onn' \(did you mean 'spend_on'\?\)"):
        allocate(inventory, problem, "cheapest", {"spend_onn": []})


@pytest.mark.tools
def test_cli_applies_and_verifies_the_custom_plan(registered, tiny_model, fork_imatrix, fork_tiny_dir, tmp_path):
    from tbpw.cli import main

    out = tmp_path / "cheap.gguf"
    # K-quants only: the cheapest IQ types make llama-quantize slow, and the constraints file gets used
    constraints = tmp_path / "constraints.yaml"
    constraints.write_text("allowed_types:\n  '.*': [Q3_K, Q4_K, Q5_K, Q6_K, Q8_0]\n")
    result = CliRunner().invoke(main, ["quantize", str(tiny_model), "--imatrix", str(fork_imatrix), "--target-bpw", "4.6",
                                       "--fork-state", str(fork_tiny_dir / "tiny.bpw_state"), "--allocator", "cheapest",
                                       "-O", "spend_on=[attn_v, ffn_down]", "--constraints", str(constraints),
                                       "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["allocator"] == "cheapest" and data["verified"] is True
    written = ModelInventory.load(out)
    assert {t.name: t.stored_type for t in written.tensors} == {t["name"]: t["type"] for t in data["tensors"]}
    assert written.bpw() == data["achieved_bpw"] <= 4.6
    assert {t.stored_type for t in written.tensors} <= {"F32", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}
    assert written["blk.0.attn_v.weight"].stored_type != "Q3_K"  # spent on
    saved = json.loads((tmp_path / "cheap.plan.json").read_text())
    assert saved["allocator_options"] == {"spend_on": ["attn_v", "ffn_down"]}


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the example's folder, the folder it is pip-installed into) — as a user installs it."""
    root = tmp_path_factory.mktemp("example")
    # install a copy (building in the source folder would leave build/ and egg-info behind)
    source = root / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert (target / "tbpw_cheapest_allocator.py").is_file()
    return source, target


@pytest.mark.slow
def test_installed_package_registers_through_its_entry_point(installed_example, monkeypatch):
    _, target = installed_example
    monkeypatch.syspath_prepend(str(target))
    from tbpw.plugin.manager import PluginManager

    try:
        manager = PluginManager()
        assert "cheapest" in manager.allocators().names()
        row = next(r for r in manager.describe() if r["name"] == "cheapest")
        assert row["version"] == "0.1.0" and row["provides"] == {"allocator": ["cheapest"]}
    finally:
        sys.modules.pop("tbpw_cheapest_allocator", None)


@pytest.mark.tools
@pytest.mark.slow
def test_the_examples_own_tests_pass_with_tbpws_pytest_plugin(installed_example, tiny_model, wiki_text, tmp_path):
    """The example's tests/ use tbpw's fixtures with no conftest: pytest loads them through tbpw's pytest11
    entry point, as in any environment where tbpw is installed."""
    source, target = installed_example
    assert not list(source.rglob("conftest.py"))
    env = {**os.environ, "PYTHONPATH": str(target), "TBPW_TEST_MODEL": str(tiny_model), "TBPW_TEST_TEXT": str(wiki_text)}
    report = tmp_path / "junit.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={report}"],
                          cwd=source, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    assert suite is not None
    ran = {case.get("name") for case in suite.iter("testcase")}
    assert ran == {"test_a_run_gives_the_named_roles_the_leftover_and_everything_else_the_cheapest_type",
                   "test_a_misspelt_option_names_the_real_one"}
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("0", "0", "0")
