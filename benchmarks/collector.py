"""Time tbpw's collector against stock llama-imatrix on the same model, text, context, chunks and threads.

    .venv/bin/python -m benchmarks.collector [--model M.gguf] [--text T.txt] [--ctx 512] [--chunks N]
                                             [--threads 2] [--repeat 5]

Prints the median wall time and CPU time (user + system) of each, process start and model load
included, and the ratios collector / stock llama-imatrix (target <= 1.2). On a busy machine the CPU
time ratio is the steadier one. Stock llama-imatrix also computes a
perplexity by default; the ratio against `llama-imatrix --no-ppl` is printed too. Runs alternate
between the tools so machine noise hits both alike. Defaults: the shared tiny model and Wikipedia sample.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from tbpw.llamacpp.imatrix import make_imatrix

REPO = Path(__file__).resolve().parent.parent

SHARED = Path(os.environ.get("TBPW_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "fork-tiny"

VARIANTS = {
    "tbpw": ("tbpw", ()),
    "stock": ("stock", ()),
    "stock --no-ppl": ("stock", ("--no-ppl",)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=FIXTURES / "tiny-f16.gguf")
    ap.add_argument("--text", type=Path, default=FIXTURES / "wiki-sample.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="tbpw-bench-") as tmp:
        for round_ in range(args.repeat + 1):
            for name, (collector, extra) in VARIANTS.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                run = make_imatrix(args.model, args.text, Path(tmp) / "imatrix.gguf", collector=collector,
                                   chunks=args.chunks, ctx=args.ctx, threads=args.threads, extra_args=extra,
                                   log_path=Path(tmp) / "run.log")
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if round_ > 0:  # the first round warms the page cache
                    times[name].append(run.seconds)
                    cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    print(f"model {args.model.name}, text {args.text.name}, ctx {args.ctx}, chunks {args.chunks or 'all'}, "
          f"threads {args.threads}, median of {args.repeat}")
    print(f"  {'':16s} {'wall':>8s}   {'cpu':>8s}")
    for name in VARIANTS:
        print(f"  {name:16s} {med[name]:8.3f} s {med_cpu[name]:8.3f} s")
    for ref in ("stock", "stock --no-ppl"):
        label = "collector / llama-imatrix" + (" --no-ppl" if ref != "stock" else "")
        print(f"{label:36s} wall {med['tbpw'] / med[ref]:.3f}  cpu {med_cpu['tbpw'] / med_cpu[ref]:.3f}"
              + ("  (target <= 1.2)" if ref == "stock" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
