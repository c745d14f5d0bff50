"""Speed targets that used to be wall-clock assertions in tests, as ratios against a baseline run in this process.

    .venv/bin/python -m benchmarks.speed [--repeat 3]

- Opening a GGUF with a 262,144-token vocabulary: tbpw's inventory (which steps over metadata arrays) against
  gguf's GGUFReader (a numpy view per entry). Target: the inventory at most 1/10 of GGUFReader's time.
- The exact knapsack on a problem with the shapes of a 26B MoE (testmodels/problems.py's `moe_like_problem`)
  against the Lagrangian solver on the same problem. Target: at most 10x the Lagrangian's time (measured
  2.9x on a 2-core machine: 0.35 s against 0.12 s; the test once asserted "under 20 s").

Prints each median time and ratio, and exits 1 when a ratio misses its target.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from testmodels.gguf_writers import write_large_vocabulary


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from gguf import GGUFReader

    from tbpw.model.inventory import ModelInventory
    from tbpw_plugins.allocators.knapsack import Knapsack
    from tbpw_plugins.allocators.lagrangian import Lagrangian
    from testmodels.problems import moe_like_problem

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_large_vocabulary(Path(tmp) / "vocab.gguf")
        ours = median_seconds(lambda: ModelInventory.load(model), args.repeat)
        theirs = median_seconds(lambda: GGUFReader(str(model)), max(1, args.repeat // 2))
        rows.append(("inventory / GGUFReader, 262k vocabulary", ours, theirs, 0.1))
    problem = moe_like_problem(4.5)
    exact = median_seconds(lambda: Knapsack(Knapsack.Options()).allocate(problem), args.repeat)
    lagrangian = median_seconds(lambda: Lagrangian(Lagrangian.Options()).allocate(problem), args.repeat)
    rows.append(("knapsack / lagrangian, MoE-sized problem", exact, lagrangian, 10.0))
    missed = 0
    for what, ours, baseline, target in rows:
        ratio = ours / baseline
        ok = ratio <= target
        missed += not ok
        print(f"{what}: {ours:.3f} s / {baseline:.3f} s = {ratio:.3f} (target <= {target:g}) {'ok' if ok else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
