"""Time the offline demo recipe end to end, against one plain stock quantization of the same model.

    .venv/bin/python -m benchmarks.demo [--recipe recipes/demo.yaml] [--keep]

Runs `tbpw run` on a fresh output folder (cold: every stage computed; the measurement cache is
bypassed with a fresh cache folder), then again (warm: every stage skipped), and prints both wall
times and their ratios to one `llama-quantize --imatrix ... Q4_K_M` of the demo model made just before.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _timed(cmd: list[str], env: dict) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    parser.add_argument("--keep", action="store_true", help="keep the run folder")
    args = parser.parse_args()

    from tbpw.data.assets import demo_model
    from tbpw.llamacpp.tools import run_tool
    from tbpw.run import recipe as recipes

    work = Path(tempfile.mkdtemp(prefix="tbpw-demo-bench-"))
    env = {**os.environ, "TBPW_MEASURE_CACHE": str(work / "measure-cache")}
    loaded = recipes.load(args.recipe)
    model = demo_model().f16
    imatrix = work / "baseline-imatrix.gguf"
    text = work / "calibration.txt"
    from tbpw.data.files import DatasetContext
    from tbpw.files import paths
    from tbpw.plugin.manager import get_manager

    cal = loaded.datasets.calibration
    shutil.copyfile(get_manager().datasets().create(cal.name, cal.options).materialize(DatasetContext(paths.assets())).path, text)
    run_tool("llama-imatrix", ["-m", model, "-f", text, "-o", imatrix, "--chunks", "8", "-c", "512"], log_path=work / "imatrix.log")
    start = time.monotonic()
    run_tool("llama-quantize", ["--imatrix", imatrix, model, work / "q4km.gguf", "Q4_K_M"], log_path=work / "q.log")
    baseline = time.monotonic() - start

    out = work / "run"
    cmd = [sys.executable, "-m", "tbpw.cli", "run", args.recipe, "--set", f"output_dir={out}"]
    cold = _timed(cmd, env)
    warm = _timed(cmd, env)
    print(f"recipe {args.recipe}: {len(loaded.targets)} targets x {len(loaded.allocators)} allocators, "
          f"{len(loaded.compare_stock)} stock types, {len(loaded.evaluators)} evaluators")
    print(f"{'step':<34}{'seconds':>10}{'ratio':>10}")
    print(f"{'stock llama-quantize Q4_K_M':<34}{baseline:>10.1f}{1.0:>10.2f}")
    print(f"{'tbpw run (cold)':<34}{cold:>10.1f}{cold / baseline:>10.1f}")
    print(f"{'tbpw run (warm, all skipped)':<34}{warm:>10.1f}{warm / baseline:>10.2f}")
    print(f"report: {out / 'report' / 'report.md'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
