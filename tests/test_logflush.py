"""The preloaded flush library keeps the last lines of llama.cpp output (upstream's log thread drops them)."""

from __future__ import annotations

import concurrent.futures
import os
import platform

import pytest

from tbpw.llamacpp import logflush
from tbpw.llamacpp.tools import _environment, run_tool


def test_preload_env_respects_the_switch_and_existing_preloads(monkeypatch):
    if platform.system() != "Linux":
        pytest.skip("the preload is built and tested on Linux")
    path, reason = logflush.shim()
    assert path is not None and path.is_file(), reason
    env = logflush.preload_env({"LD_PRELOAD": "/other/lib.so"})
    assert env == {"LD_PRELOAD": f"{path}:/other/lib.so"}
    assert logflush.preload_env({logflush.DISABLE_ENV: "1"}) == {}
    monkeypatch.setenv(logflush.DISABLE_ENV, "1")
    assert _environment(None).get("LD_PRELOAD") == os.environ.get("LD_PRELOAD")
    assert logflush.status()["active"] is False


def test_the_library_is_rebuilt_under_a_new_cache_root(tmp_path, monkeypatch):
    if platform.system() != "Linux":
        pytest.skip("the preload is built and tested on Linux")
    monkeypatch.setenv("TBPW_HOME", str(tmp_path))
    path, reason = logflush.shim()
    assert path is not None and path.is_relative_to(tmp_path) and path.is_file(), reason


@pytest.mark.tools
def test_final_lines_survive_concurrent_runs(tmp_path, active_build, tiny_model, wiki_text):
    """Without the preload about half of such runs lost `Final estimate` on a loaded 2-core machine."""
    def one(i: int) -> bool:
        run = run_tool("llama-perplexity", ["-m", tiny_model, "-f", wiki_text, "-c", "128", "--chunks", "2", "-t", "1"],
                       log_path=tmp_path / f"ppl-{i}.log")
        return "Final estimate: PPL" in run.output

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        kept = list(pool.map(one, range(16)))
    assert all(kept), f"{kept.count(False)} of {len(kept)} runs lost their final line"
