"""Fixtures every test module shares: the shared fixtures folder, the tiny model, the active build, manager.

Tests marked ``tools`` run the real llama.cpp binaries. They FAIL (never skip) when no build is active:
CI always runs ``tbpw build`` first, so a missing build is a broken setup, not a reason to pass.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# A shell starts a background job (`cmd &`) with SIGINT ignored, and the tools and `tbpw` processes the tests
# start would inherit that and never see the Ctrl-C the interruption tests send them. A handler (not an
# ignore) is reset to the default at exec, so every child gets Python's own KeyboardInterrupt again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path:
    env = os.environ.get("TBPW_SHARED")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared").resolve()


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test input {path} is missing: set TBPW_SHARED to the folder holding fixtures/fork-tiny")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """$TBPW_SHARED, else <repo>/../shared: reference notes and fixtures that are not part of the repo."""
    return _require(_shared_dir())


@pytest.fixture(scope="session")
def fork_tiny_dir(shared_dir: Path) -> Path:
    """The fork's reference outputs on the tiny model (see its README.md)."""
    return _require(shared_dir / "fixtures" / "fork-tiny")


@pytest.fixture(scope="session")
def tiny_model(fork_tiny_dir: Path) -> Path:
    """A 4.46 M-parameter llama in F16 (4 layers, vocab 4096, tied embeddings)."""
    return _require(fork_tiny_dir / "tiny-f16.gguf")


@pytest.fixture(scope="session")
def wiki_text(fork_tiny_dir: Path) -> Path:
    """120 kB of English Wikipedia text, the calibration text of the fixtures."""
    return _require(fork_tiny_dir / "wiki-sample.txt")


@pytest.fixture(scope="session")
def fork_imatrix(fork_tiny_dir: Path) -> Path:
    """The fork's imatrix of the tiny model (in_sum2, counts, in_sum, stats)."""
    return _require(fork_tiny_dir / "tiny.fork-imatrix.gguf")


@pytest.fixture(scope="session")
def stock_imatrix(fork_tiny_dir: Path) -> Path:
    """Stock llama.cpp b11312's imatrix of the tiny model (in_sum2, counts)."""
    return _require(fork_tiny_dir / "tiny.stock-imatrix.gguf")


@pytest.fixture(scope="session")
def active_build():
    """The active llama.cpp build (BuildInfo); a test that needs it fails when there is none."""
    from tbpw.errors import TbpwError
    from tbpw.llamacpp.build import active_build as find_active

    try:
        return find_active()
    except TbpwError as exc:
        pytest.fail(f"no usable llama.cpp build ({exc})", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _own_store_and_scores(tmp_path_factory: pytest.TempPathFactory):
    """The tensor store and the kept calibration scores of a test session live in its own folder, not the user's."""
    folder = tmp_path_factory.mktemp("caches")
    saved = {key: os.environ.get(key) for key in ("TBPW_STORE", "TBPW_CALIBRATION_CACHE")}
    os.environ["TBPW_STORE"], os.environ["TBPW_CALIBRATION_CACHE"] = str(folder / "store"), str(folder / "calibration")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _tools_need_a_build(request: pytest.FixtureRequest) -> None:
    # Marked tests get the build check even when they do not ask for `active_build` themselves.
    if request.node.get_closest_marker("tools") is not None:
        request.getfixturevalue("active_build")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh folder for one test's outputs and logs."""
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def plugin_manager():
    """A fresh plugin manager (entry points loaded) that later tests never see."""
    from tbpw.plugin import manager

    manager.reset_manager()
    try:
        yield manager.get_manager()
    finally:
        manager.reset_manager()


@pytest.fixture(scope="session")
def inventory(tiny_model: Path):
    """The tiny model's tensor inventory."""
    from tbpw.model.inventory import ModelInventory

    return ModelInventory.load(tiny_model)


@pytest.fixture(scope="session")
def fork_table(fork_tiny_dir: Path):
    """The fork's state file of the tiny model (its error table), as tbpw reads it."""
    from tbpw.measure import forkstate

    return forkstate.read(fork_tiny_dir / "tiny.bpw_state")


@pytest.fixture(scope="session")
def fork_error_table(fork_table):
    """The fork's state file as a tbpw ErrorTable (what `tbpw measure --out` writes)."""
    from tbpw.measure.table import ErrorTable

    return ErrorTable.from_fork_state(fork_table)


@pytest.fixture(scope="session")
def full_table(inventory):
    """A synthetic error table over every candidate type of the tiny model (tests/tables.py)."""
    from tables import synthetic_table

    return synthetic_table(inventory)


@pytest.fixture
def split_text(wiki_text: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(calibration, evaluation): the first and second half of wiki-sample.txt, cut at a paragraph."""
    text = wiki_text.read_text(encoding="utf-8")
    cut = text.index("\n\n", len(text) // 2)
    cal, ev = tmp_path / "calibration.txt", tmp_path / "evaluation.txt"
    cal.write_text(text[:cut] + "\n", encoding="utf-8")
    ev.write_text(text[cut:].lstrip("\n"), encoding="utf-8")
    return cal, ev
