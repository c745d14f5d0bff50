"""`tbpw run --executor ray` on a cluster address that cannot be reached stops with one line, bounded by the
executor's `connect_timeout_s`, instead of Ray's own retries (20 tries of about 41 s, only Ray's warnings shown).

With real Ray, on local addresses: a port nobody listens on (the TCP connect the executor makes first says so),
and a port that accepts TCP connections but is no Ray GCS (ray.init itself, with Ray's GCS timeouts cut down to
the option and one try). Neither test measures time: each checks the line, the option's value in it, and which
of the two bounded waits gave it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main

pytest.importorskip("ray")
pytestmark = pytest.mark.tools  # `tbpw run` needs the active llama.cpp build before the executor opens

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"
HINT = ": start it with `ray start --head` or fix executor.options.address"


def _sets(tiny_model: Path, wiki_text: Path, out: Path, address: str, timeout_s: int) -> list[str]:
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}",
            f"executor.options.address={address}", f"executor.options.connect_timeout_s={timeout_s}"]
    return ["--executor", "ray", *(arg for s in sets for arg in ("--set", s))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "executor ray:" in line]


def test_a_port_nobody_listens_on_is_one_line_from_the_tcp_connect(tiny_model, wiki_text, tmp_path):
    import ray

    port = _free_port()
    result = CliRunner().invoke(main, ["run", str(RECIPE), *_sets(tiny_model, wiki_text, tmp_path / "out",
                                                                   f"127.0.0.1:{port}", 7)])
    assert result.exit_code != 0
    assert _error_lines(result.output) == [
        f"error: executor ray: cannot reach the Ray cluster at 127.0.0.1:{port} within 7 s "
        f"(TCP connect: Connection refused){HINT}"], result.output
    assert not ray.is_initialized()  # the TCP connect answered: ray.init was never called
    assert not any(name.startswith("RAY_gcs") or name.startswith("RAY_py_gcs") for name in os.environ)


def test_a_port_that_is_no_ray_gcs_is_one_line_from_one_bounded_ray_try(tiny_model, wiki_text, tmp_path):
    with socket.socket() as listener:  # accepts TCP connections (the kernel does), never answers one
        listener.bind(("0.0.0.0", 0))  # every address: Ray dials this machine's own IP for 127.0.0.1
        listener.listen(64)
        port = listener.getsockname()[1]
        args = _sets(tiny_model, wiki_text, tmp_path / "out", f"127.0.0.1:{port}", 6)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # a subprocess, so a wait that is not bounded fails the test instead of hanging it (Ray alone: ~14 min)
        proc = subprocess.run([sys.executable, "-m", "tbpw.cli", "run", str(RECIPE), *args], capture_output=True,
                              text=True, timeout=240, env=env)
    assert proc.returncode != 0
    assert _error_lines(proc.stderr + proc.stdout) == [
        f"error: executor ray: cannot reach the Ray cluster at 127.0.0.1:{port} within 6 s (TCP connects, but Ray "
        f"did not join a GCS there, see Ray's warnings above: Failed to connect to Ray cluster at "
        f"{_ray_address(proc.stderr, port)}){HINT}"], proc.stderr
    # Ray's own lines show the bound it got from the option: channel waits of 6 // 6 = 1 s (Ray's default: 5 s)
    # and a single try for the cluster ID (Ray's default: 20)
    assert re.search(rf"Failed to connect to GCS at address \S+:{port} within 1 seconds", proc.stderr), proc.stderr
    assert proc.stderr.count("Failed to get cluster ID from GCS server") == 1, proc.stderr


def _ray_address(stderr: str, port: int) -> str:
    """The address Ray dialled (it replaces 127.0.0.1 with this machine's IP)."""
    found = re.search(rf"Connecting to existing Ray cluster at address: (\S+:{port})", stderr)
    assert found, stderr
    return found.group(1).rstrip(".")
