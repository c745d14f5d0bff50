"""`pip install .` (not editable) gives a working tbpw: the package carries the built-in plugins (tbpw_plugins)
and vendor/ (tbpw_vendor: the llama.cpp pins and tbpw's own native sources), so `tbpw build` and `tbpw doctor`
work with no checkout in reach.

The package is installed with `pip install --no-deps --target` into a temporary folder, from a copy of the files
a source distribution holds, and run from a folder outside the repository by this environment's interpreter
with `-S`: site-packages (the dependencies) is on PYTHONPATH behind the installed package, and its `.pth` files,
the editable install's finder among them, are never run, so nothing can come from the checkout. `tbpw build`
must find the build the other tests use in the cache (same key) and return at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SDIST = ("pyproject.toml", "README.md", "tbpw", "plugins", "vendor")  # what building the package reads

pytestmark = [pytest.mark.tools, pytest.mark.slow]

PROVENANCE = """
import importlib, importlib.metadata as md, json, sys
import tbpw, tbpw.cli, tbpw_plugins, tbpw_vendor
from tbpw.files.paths import vendor_dir
from tbpw.llamacpp import collector
repo, deps = sys.argv[1], sys.argv[2:]
eps = {ep.name: importlib.import_module(ep.value).__file__ for ep in md.entry_points(group="tbpw")}
from_checkout = sorted(name for name, m in list(sys.modules.items())
                       if (getattr(m, "__file__", None) or "").startswith(repo + "/")
                       and not any(m.__file__.startswith(d + "/") for d in deps))
print(json.dumps({"tbpw": tbpw.__file__, "tbpw_plugins": tbpw_plugins.__file__,
                  "tbpw_vendor": list(tbpw_vendor.__path__), "vendor_dir": str(vendor_dir()),
                  "collector": str(collector.source_dir()), "entry_points": eps, "from_checkout": from_checkout,
                  "script": md.distribution("tbpw").entry_points.select(group="console_scripts")["tbpw"].value}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path, list[str]]:
    """(the install folder, the environment to run it with, a working folder outside the repository, deps)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SDIST:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    target = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-compile", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # installing prints no deprecation of tbpw's own packaging (the licence as an SPDX string, ...)
    noise = [line for line in (done.stdout + done.stderr).splitlines()
             if re.search(r"(?i)deprecat|BuildBackendWarning|SetuptoolsWarning", line)]
    assert noise == [], "\n".join(noise)
    deps = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    env = {k: v for k, v in os.environ.items() if k not in ("TBPW_VENDOR", "PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=os.pathsep.join([str(target), *deps]), PYTHONNOUSERSITE="1")
    work = root / "elsewhere"
    work.mkdir()
    return target, env, work, deps


def _run(installed, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    target, env, work, _ = installed
    return subprocess.run([sys.executable, "-S", *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _tbpw(installed, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return _run(installed, str(installed[0] / "bin" / "tbpw"), *args, timeout=timeout)


def test_the_package_holds_the_plugins_the_pins_and_the_native_sources(installed):
    target = installed[0]
    for path in ("tbpw/py.typed", "tbpw_vendor/llama-cpp.toml", "tbpw_vendor/assets.toml",
                 "tbpw_vendor/native/flush_logs.c", "tbpw_vendor/native/collector/collector.cpp",
                 "tbpw_plugins/allocators/knapsack.py", "tbpw_plugins/metrics/wmse.py",
                 "tbpw_plugins/datasets/sources.py", "tbpw_plugins/evaluators/kld.py", "bin/tbpw"):
        assert (target / path).is_file(), path
    for package in ("tbpw", "tbpw_plugins"):  # every module of the tree, nothing left behind
        tree = REPO / ("plugins" if package == "tbpw_plugins" else package)
        wanted = {p.relative_to(tree) for p in tree.rglob("*.py")}
        assert wanted <= {p.relative_to(target / package) for p in (target / package).rglob("*.py")}


def test_everything_comes_from_the_installed_package(installed):
    target, _, _, deps = installed
    done = _run(installed, "-c", PROVENANCE, str(REPO), *deps)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    inside = str(target) + os.sep
    assert found["tbpw"].startswith(inside) and found["tbpw_plugins"].startswith(inside)
    assert found["tbpw_vendor"] == [str(target / "tbpw_vendor")]
    assert found["vendor_dir"] == str(target / "tbpw_vendor")
    assert found["collector"] == str(target / "tbpw_vendor" / "native" / "collector")
    assert set(found["entry_points"]) >= {"allocators", "metrics", "datasets", "evaluators"}
    assert all(path.startswith(inside) for path in found["entry_points"].values()), found["entry_points"]
    assert found["from_checkout"] == []
    assert found["script"] == "tbpw.cli:main"


def test_build_returns_the_cached_build_and_doctor_reports_it(installed):
    from tbpw.files import paths
    from tbpw.llamacpp import build as builds
    from tbpw.llamacpp import collector, sources

    src = sources.resolve(None)
    backend = builds.detect_backend("auto")
    root = paths.builds() / builds.build_key(src, backend, builds.cmake_flags(src, backend))
    if not (root / "build.json").is_file():
        pytest.fail(f"no cached build {root}: run `tbpw build` first", pytrace=False)
    stamps = {p: p.stat().st_mtime_ns for p in (root / "build.json", root / "bin" / collector.NAME) if p.exists()}

    done = _tbpw(installed, "build")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ready in {root / 'bin'}" in done.stdout
    # the same llama.cpp build, and the collector compiled from the same sources: nothing was rebuilt
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    done = _tbpw(installed, "doctor", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["build"]["root"] == str(builds.active_build().root)
    assert report["build"]["build_number"] == src.build_number
    assert all(Path(tool).is_file() for tool in report["build"]["tools"].values())
    assert report["output_flush"]["active"] is True

    done = _tbpw(installed, "doctor")
    assert done.returncode == 0 and "llama.cpp build" in done.stdout, done.stdout + done.stderr


def test_the_installed_command_lists_the_built_in_plugins(installed):
    done = _tbpw(installed, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)["plugins"]}
    assert {"allocators", "metrics", "datasets", "evaluators"} <= set(rows)
    assert "knapsack" in rows["allocators"]["provides"]["allocator"]
