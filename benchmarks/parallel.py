"""Wall time of one recipe under the executors, as ratios to a sequential run made in the same process.

    nice .venv/bin/python -m benchmarks.parallel [--recipe tests/recipes/tiny.yaml] [--set KEY=VALUE ...]
                                                 [--repeat 1] [--no-ray]

Runs the recipe cold (a fresh output folder and a fresh measurement cache, so every stage is computed)
with `local` and 1 worker (the baseline: one stage at a time), `local` with 2 workers, and `ray` on a local
cluster of this machine's CPUs (1 CPU per task; the cluster's start-up is timed separately and not counted).
Prints each wall time and its speed-up over the baseline (baseline time / its time): the figures of
docs/results/speed.md. The tiny recipe's model and texts default to the shared fixtures (../shared, or
$TBPW_SHARED).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _fixture_sets() -> list[str]:
    shared = Path(os.environ.get("TBPW_SHARED", REPO.parent / "shared")) / "fixtures" / "fork-tiny"
    text = shared / "wiki-sample.txt"
    return [f"model.gguf={shared / 'tiny-f16.gguf'}", f"datasets.calibration.options.path={text}",
            f"datasets.evaluation.options.path={text}"]


def _cold_run(recipe: str, sets: list[str], work: Path, label: str, executor: list[str]) -> float:
    from tbpw.run import recipe as recipes
    from tbpw.run.pipeline import Pipeline

    out = work / label
    os.environ["TBPW_MEASURE_CACHE"] = str(work / f"measure-cache-{label}")  # every stage computed, every time
    loaded = recipes.load(recipe, [*sets, *executor, f"output_dir={out}"])
    start = time.monotonic()
    Pipeline(loaded, log=lambda line: None).run()
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "tests" / "recipes" / "tiny.yaml"))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each executor (the fastest counts)")
    parser.add_argument("--no-ray", action="store_true", help="leave out the ray executor")
    args = parser.parse_args()
    sets = (_fixture_sets() if args.recipe.endswith("tiny.yaml") else []) + args.sets
    work = Path(tempfile.mkdtemp(prefix="tbpw-parallel-bench-"))
    cpus = os.cpu_count() or 1
    executors = {"local, 1 worker (baseline)": ["executor={name: local, options: {workers: 1}}"],
                 "local, 2 workers": ["executor={name: local, options: {workers: 2}}"]}
    ray_start = None
    if not args.no_ray:
        import ray

        start = time.monotonic()
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
        ray_start = time.monotonic() - start
        executors[f"ray, local cluster of {cpus} CPUs"] = ["executor={name: ray, options: {cpus_per_task: 1}}"]
    try:
        times = {}
        for label, executor in executors.items():
            runs = [_cold_run(args.recipe, sets, work, f"{label.split(',')[0]}-{executor[0][-4:-2]}-{i}", executor)
                    for i in range(args.repeat)]
            times[label] = min(runs)
    finally:
        if ray_start is not None:
            import ray

            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    baseline = times["local, 1 worker (baseline)"]
    print(f"recipe {args.recipe} on {cpus} CPUs, cold (every stage computed), best of {args.repeat}")
    print(f"{'executor':<34} {'wall (s)':>9} {'speed-up':>9}")
    for label, seconds in times.items():
        print(f"{label:<34} {seconds:>9.1f} {baseline / seconds:>8.2f}x")
    if ray_start is not None:
        print(f"(ray's local cluster took {ray_start:.1f} s to start, not counted)")


if __name__ == "__main__":
    main()
