"""`tbpw run` on the tiny recipe under every executor gives what a sequential run gives: the same manifests,
byte-identical GGUFs and the same report numbers (llama-bench's speeds aside: they are measurements of time).

The reference is `local` with one worker (a sequential run). Every other run uses the same run directory path,
because llama-quantize writes the imatrix's path into each GGUF. Then: `local` with two workers, interrupted
with Ctrl-C and resumed; `ray` on a local cluster (2 CPUs, no dashboard); `ray` again with the worker of a
quantization killed mid-stage; and a worker whose llama.cpp build differs from the driver's, refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"
pytestmark = [pytest.mark.tools, pytest.mark.slow]
RAY = ["--executor", "ray", "--set", "executor.options.num_cpus=2"]
VOLATILE = ("seconds", "finished")  # when and how long: never the same twice


def _sets(tiny_model: Path, wiki_text: Path, out: Path) -> list[str]:
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}"]
    return [arg for s in sets for arg in ("--set", s)]


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["run", str(RECIPE), *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def layout(tmp_path_factory, tiny_model, wiki_text):
    """(run dir, reference copy, the --set args): the sequential reference run, copied aside."""
    base = tmp_path_factory.mktemp("executors")
    out, reference = base / "tiny", base / "reference"
    args = _sets(tiny_model, wiki_text, out)
    output = _run([*args, "--set", "executor.options.workers=1"])
    assert "executor: local, 1 worker" in output
    assert re.search(r"^plan: \d+ stages \(\d+ to run, 0 finished earlier", output, re.M)
    shutil.copytree(out, reference)
    return out, reference, args


def test_a_plan_after_the_run_reuses_every_stage(layout):
    out, _, args = layout
    output = _run([*args, "--plan"])
    listed = dict((name, status) for status, name in re.findall(r"^(run|reuse\?|as is) +(\S+)$", output, re.M))
    assert listed.pop("model") == "as is"  # a float GGUF: no copy
    assert set(listed) == set(_stages(out)) and set(listed.values()) == {"reuse?"}
    assert re.search(rf"^plan: {len(listed) + 1} stages \(0 to run, {len(listed)} finished earlier", output, re.M)
    assert "plan: time: roughly 0 s on this machine's CPU for the stages to run" in output  # nothing left to price


def _stages(root: Path) -> dict[str, dict]:
    return {m.parent.name: json.loads(m.read_text()) for m in root.glob("*/manifest.json")}


def assert_same_run(out: Path, reference: Path) -> None:
    want, got = _stages(reference), _stages(out)
    assert sorted(got) == sorted(want)
    for stage, manifest in want.items():
        mine = got[stage]
        assert mine["key"] == manifest["key"], stage  # same inputs (content hashes), options and build
        for field in ("stage", "options", "inputs"):
            assert mine[field] == manifest[field], (stage, field)
        if not stage.startswith("bench-"):
            assert mine["result"] == manifest["result"], stage
        assert set(manifest) - set(VOLATILE) <= set(mine)
    ggufs = sorted(p.relative_to(reference) for p in reference.glob("*/*.gguf"))
    assert len(ggufs) >= 5
    for rel in ggufs:
        assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel
    first, second = (json.loads((r / "report" / "report.json").read_text()) for r in (reference, out))
    speeds = ("bench", "bench_rows")  # measured speeds: they differ from run to run
    for a, b in zip(first["entries"], second["entries"], strict=True):
        assert {k: v for k, v in a.items() if k not in speeds} == {k: v for k, v in b.items() if k not in speeds}
        assert set(a["bench"]) == set(b["bench"])
        assert [row.keys() for row in a.get("bench_rows", [])] == [row.keys() for row in b.get("bench_rows", [])]
    assert {k: v for k, v in first.items() if k != "entries"} == {k: v for k, v in second.items() if k != "entries"}


def _tool_processes_in(folder: Path) -> list[int]:
    """llama.cpp tools still running on files of `folder` (none may outlive an interrupted run)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in text and "llama-" in text.split(" ", 1)[0]:
            found.append(int(cmdline.parent.name))
    return found


def test_two_local_workers_interrupted_and_resumed_equal_the_sequential_run(layout, tmp_path):
    out, reference, args = layout
    shutil.rmtree(out)
    cmd = [sys.executable, "-m", "tbpw.cli", "run", str(RECIPE), *args, "--set", "executor.options.workers=2"]
    env = dict(os.environ, TBPW_MEASURE_CACHE=str(tmp_path / "measure-cache"))  # a measure long enough to stop
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((out / ".measure.partial").exists() and (out / "stock-Q3_K_M" / "manifest.json").exists()):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the run never got to its measure stage"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C on the driver alone (a terminal would signal its tools as well)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output  # 128 + SIGINT
    assert "interrupted: " in output and "run the same command again to resume" in output
    assert not (out / "measure" / "manifest.json").exists() and (out / "stock-Q3_K_M" / "manifest.json").exists()
    assert _tool_processes_in(out) == []
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "skip  stock-Q3_K_M" in resumed.stderr and "done  measure" in resumed.stderr
    assert "executor: local, 2 workers" in resumed.stderr and "running: " in resumed.stderr
    assert_same_run(out, reference)


def test_ray_on_a_local_cluster_equals_the_sequential_run(layout):
    out, reference, args = layout
    shutil.rmtree(out)
    output = _run([*args, *RAY])
    assert "executor: ray on a local cluster" in output
    assert_same_run(out, reference)


class _Killer(threading.Thread):
    """SIGKILLs the Ray worker running task `name` (its process title is `ray::<name>`), once."""

    def __init__(self, name: str):
        super().__init__(daemon=True)
        self.title, self.killed, self.stop = f"ray::{name}", [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.killed:
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    title = cmdline.read_bytes().split(b"\0")[0].decode(errors="replace").strip()
                except OSError:
                    continue
                if title == self.title:
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
                    self.killed.append(int(cmdline.parent.name))
                    return
            time.sleep(0.05)


def test_a_ray_worker_killed_mid_stage_is_retried_and_the_run_completes_the_same(layout):
    out, reference, args = layout
    shutil.rmtree(out)
    shutil.copytree(reference, out)
    for stage in [*out.glob("quant-*"), *out.glob("eval-*"), *out.glob("bench-*"), out / "report"]:
        shutil.rmtree(stage)
    killer = _Killer("quant-3.5bpw-knapsack")  # its allocation and llama-quantize take seconds
    killer.start()
    try:
        output = _run([*args, *RAY])
    finally:
        killer.stop.set()
    assert killer.killed, "the quantization's worker was never seen running"
    assert "skip  measure" in output and "done  quant-3.5bpw-knapsack" in output
    assert not list(out.glob(".*.partial"))
    assert_same_run(out, reference)


def test_a_worker_with_another_build_is_refused_with_one_line(layout, tmp_path, active_build):
    out, _, args = layout
    other = tmp_path / "other-build"
    (other / "bin").mkdir(parents=True)
    data = json.loads((active_build.root / "build.json").read_text())
    (other / "build.json").write_text(json.dumps({**data, "key": "0123456789abcdef"}))
    env = json.dumps({"env_vars": {"TBPW_BUILD": str(other)}})
    result = CliRunner().invoke(main, ["run", str(RECIPE), *args, *RAY, "--set",
                                       f"executor.options.runtime_env={env}", "--set", f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(
        rf"error: (model|data-\w+): the worker on {re.escape(os.uname().nodename)} has llama.cpp build 0123456789abcdef, "
        rf"the driver {active_build.key}: run the same `tbpw build` \(source, backend, options\) on every node, since "
        r"outputs differ across builds", errors[0]), result.output
    assert not (tmp_path / "run" / "report").exists()
