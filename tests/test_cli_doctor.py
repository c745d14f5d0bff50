"""`tbpw doctor` and the feature detection behind it, on the real active build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.errors import TbpwError
from tbpw.llamacpp import features, sources
from tbpw.llamacpp.build import TOOLS


def run_cli(*args: str, env: dict | None = None):
    from tbpw.cli import main

    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.mark.tools
def test_doctor_json_reports_the_build_and_its_features(active_build):
    result = run_cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    build, detected = data["build"], data["detected"]
    # What the tools say about themselves matches the pin the build was made from.
    assert detected["build_number"] == active_build.build_number == build["build_number"]
    assert detected["commit"] == active_build.build_commit
    if active_build.source_name == "upstream":
        _, known = sources.load_lock()
        assert detected["build_number"] == known["upstream"].build_number == 11312
    assert build["backend"] == active_build.backend
    assert set(build["tools"]) == set(TOOLS)
    for path in [*build["tools"].values(), build["libggml_base"], build["log"]]:
        assert Path(path).is_file(), path
    assert Path(build["libggml_base"]).name.startswith("libggml-base")
    quantize = data["features"]["llama-quantize"]
    assert quantize["--tensor-type-file"] and quantize["--dry-run"]
    assert data["features"]["llama-perplexity"]["--kl-divergence-base"]
    assert "Q4_K_M" in detected["quantize_types"]
    assert data["output_flush"]["active"] is True
    assert data["warnings"] == []


@pytest.mark.tools
def test_doctor_text_names_build_paths_and_features(active_build):
    result = run_cli("doctor")
    assert result.exit_code == 0
    assert f"llama.cpp build {active_build.build_number}, commit {active_build.build_commit}" in result.output
    assert str(active_build.tool("llama-quantize")) in result.output
    assert str(active_build.log_path) in result.output
    assert "--tensor-type-file" in result.output


def test_doctor_without_a_build_says_what_to_do(tmp_path):
    env = {"TBPW_HOME": str(tmp_path / "empty-home"), "TBPW_BUILD": None}
    result = run_cli("doctor", "--json", env=env)
    assert result.exit_code == 2
    assert result.output == "error: llama.cpp is not built yet: run `tbpw build` first\n"


@pytest.mark.tools
def test_feature_detection_is_cached_per_build(active_build):
    fresh = features.detect(active_build, refresh=True)
    cache = active_build.root / features.CACHE_FILE
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    again = features.detect(active_build)
    assert again == fresh
    assert cache.stat().st_mtime_ns == stamp  # answered from the cache, not by running the tools again
    assert fresh.tensor_type_file and fresh.dry_run
    assert fresh.build_number == active_build.build_number
    assert fresh.has("--kl-divergence", tool="llama-perplexity")
    assert not fresh.has("--no-such-option")


@pytest.mark.tools
def test_a_changed_tool_invalidates_the_cache(active_build, tmp_path):
    features.detect(active_build)
    cache = active_build.root / features.CACHE_FILE
    data = json.loads(cache.read_text())
    data["fingerprint"][0][1] += 1  # as if llama-quantize had been rebuilt with another size
    data["features"]["options"]["llama-quantize"] = ["--bogus"]
    cache.write_text(json.dumps(data))
    assert features.detect(active_build).tensor_type_file  # re-probed, not the doctored cache
    assert "--bogus" not in json.loads(cache.read_text())["features"]["options"]["llama-quantize"]


@pytest.mark.tools
def test_ensure_tool_features(active_build):
    present = features.ensure_tool_features("--tensor-type-file", "--dry-run", build=active_build)
    assert present.tensor_type_file
    features.ensure_tool_features("--kl-divergence-base", tool="llama-perplexity", build=active_build)
    if present.target_bpw:
        pytest.skip("the active build is the target-bpw fork")  # the message below is for stock builds
    with pytest.raises(TbpwError) as info:
        features.ensure_tool_features("--target-bpw", "--imatrix", purpose="the fork-native allocator",
                                      build=active_build)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"llama-quantize of the active build ({active_build.source_name}, build "
                              f"{active_build.build_number}) has no --target-bpw (needed for the fork-native allocator)")
    assert "tbpw build --source fork" in message


@pytest.mark.tools
def test_a_damaged_feature_cache_is_recomputed(active_build):
    cache = active_build.root / features.CACHE_FILE
    cache.write_text("{not json")
    assert features.detect(active_build).dry_run
    assert json.loads(cache.read_text())["detection"] == features.DETECTION_VERSION


def test_detection_without_a_build_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TBPW_HOME", str(tmp_path))
    monkeypatch.delenv("TBPW_BUILD", raising=False)
    with pytest.raises(TbpwError, match="run `tbpw build` first"):
        features.detect()


def test_version_is_asked_only_of_tools_that_list_the_flag():
    options = {"llama-bench": ["--help", "--list-devices"], "llama-perplexity": ["--help", "--version"],
               "llama-imatrix": ["--version"], "llama-quantize": ["--help"]}
    assert features.version_tools(options) == ["llama-perplexity", "llama-imatrix"]
    assert features.version_tools({"llama-bench": ["--version"], "llama-imatrix": ["--version"]}) == ["llama-bench",
                                                                                                        "llama-imatrix"]
    assert features.version_tools({}) == []


@pytest.mark.tools
def test_a_build_whose_llama_bench_has_no_version_flag(active_build, tmp_path):
    """The target-bpw fork's llama-bench has no --version (nor does llama-quantize anywhere): detection takes the
    version from a tool that has it, and doctor says so instead of failing."""
    import shutil

    from tbpw.llamacpp.build import BuildInfo
    from tbpw.llamacpp.doctor import report

    root = tmp_path / "build"
    (root / "bin").mkdir(parents=True)
    for f in active_build.bin_dir.iterdir():
        (root / "bin" / f.name).symlink_to(f)
    # a real llama.cpp tool without --version in llama-bench's place: stock llama-quantize's launcher
    (root / "bin" / "llama-bench").unlink()
    shutil.copy2(active_build.tool("llama-quantize"), root / "bin" / "llama-bench")
    shutil.copy2(active_build.root / "build.json", root / "build.json")
    build = BuildInfo.load(root)
    found = features.detect(build)
    assert "--version" not in found.options["llama-bench"] and "--tensor-type-file" in found.options["llama-bench"]
    assert found.version_from == "llama-perplexity --version"
    assert (found.build_number, found.commit) == (active_build.build_number, active_build.build_commit)
    assert found.devices == []  # no --list-devices either: nothing asked, nothing seen
    data = report(build)
    assert data["detected"]["version_from"] == "llama-perplexity --version"
    assert [w for w in data["warnings"] if "no --version" in w] == [
        "llama-bench of this build has no --version: the version is from llama-perplexity --version"]
