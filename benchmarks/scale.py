"""tbpw at Gemma-4-26B-A4B's scale: measure, allocate and quantize at increasing depth, against one stock quantization.

    nice .venv/bin/python -m benchmarks.scale --work DIR [--layers 1 --layers 2 --layers 12] [--threads 2]
        [--types Q4_K,Q6_K,Q8_0] [--target-bpw 4.5] [--store] [--keep] [--json OUT.json]

For each depth it writes the synthetic model and imatrix of testmodels/synthetic_gemma4.py into DIR, then runs,
each stage in a fresh child process so that its peak memory is its own:

  1. stock   llama-quantize --imatrix I MODEL out.gguf Q4_K_M THREADS          (the baseline)
  2. measure tbpw's error table on an empty cache (the fork's 20 candidate types unless --types)
  3. allocate the knapsack plan for --target-bpw from that table (the Planner, as `tbpw quantize` does)
  4. quantize Planner.write: stock llama-quantize with the plan's tensor-type file, then the output verified
  5. assemble (with --store) Planner.write as `tbpw run` does it: every planned (tensor, type) quantized into a
             fresh tensor store through libggml, the GGUF assembled from the blobs, then verified

and prints for each: wall seconds and CPU seconds as ratios to the stock run's (CPU time is the steadier one on a
shared machine), the peak RSS of the Python process (VmHWM), its
peak anonymous RSS (RssAnon, sampled: what must fit in memory; the rest of the RSS is clean pages of the
memory-mapped model, which the kernel drops under pressure) and the peak RSS of llama-quantize (its children).
The bar (issue 14): the Python process's peak RSS under 2 GB plus the largest tensor, whatever the depth.
`--types` limits the candidate types (the measurement's cost grows with them, its memory does not).
Generated files are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchmarks.childmemory import monitor
from testmodels.synthetic_gemma4 import write_imatrix, write_model

REPO = Path(__file__).resolve().parent.parent

_MONITOR = monitor(0.05)  # benchmarks/childmemory.py: what the child reports and why
_REPORT = textwrap.dedent("""
    _anon[0] = max(_anon[0], _status("RssAnon"))
    _own, _kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"seconds": time.monotonic() - _start, "hwm_kib": _status("VmHWM"), "anon_kib": _anon[0],
                      "children_kib": _kids.ru_maxrss, "cpu_seconds": _own.ru_utime + _own.ru_stime + _kids.ru_utime
                      + _kids.ru_stime, **_extra}))
""")


def child(body: str) -> dict:
    """Run `body` (which sets `_extra`) in a fresh Python; its wall time and peak memory."""
    code = _MONITOR + textwrap.dedent(body) + _REPORT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"stage failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stock(model: Path, imatrix: Path, out: Path, threads: int) -> dict:
    args = ["--imatrix", str(imatrix), str(model), str(out), "Q4_K_M", str(threads)]
    return child(f"""
        from tbpw.llamacpp.tools import run_tool
        run = run_tool("llama-quantize", {args!r}, log_path={str(out) + '.log'!r})
        _extra = {{"tool_seconds": run.seconds}}
    """)


def measure(model: Path, imatrix: Path, table: Path, cache: Path, threads: int, types: list[str] | None) -> dict:
    return child(f"""
        from tbpw.measure.engine import measure
        t = measure({str(model)!r}, {str(imatrix)!r}, candidates={types!r}, threads={threads}, cache_dir={str(cache)!r},
                    progress=False)
        t.write_json({str(table)!r})
        _extra = {{"tensors": len(t.tensors)}}
    """)


def allocate(model: Path, imatrix: Path, table: Path, plan: Path, target_bpw: float) -> dict:
    return child(f"""
        from tbpw.model.budget import Target
        from tbpw.allocate.service import Planner
        from tbpw.files.atomic import write_json
        from tbpw.measure.table import ErrorTable
        planner = Planner({str(model)!r}, {str(imatrix)!r})
        p = planner.plan(ErrorTable.read_json({str(table)!r}), Target.parse(bpw={target_bpw}), "knapsack")
        write_json({str(plan)!r}, p.to_json())
        _extra = {{"achieved_bpw": p.achieved_bpw}}
    """)


def quantize(model: Path, imatrix: Path, plan: Path, out: Path, threads: int, store: Path | None = None) -> dict:
    return child(f"""
        from tbpw.allocate.plan import Plan
        from tbpw.allocate.service import Planner
        from tbpw.quantize.store import TensorStore
        store = TensorStore({str(store)!r}) if {store is not None} else None
        planner = Planner({str(model)!r}, {str(imatrix)!r}, threads={threads}, store=store)
        applied = planner.write(Plan.from_json(json.load(open({str(plan)!r}))), {str(out)!r})
        _extra = {{"tool_seconds": applied.seconds, "achieved_bpw": applied.achieved_bpw, "file_bytes": applied.file_bytes}}
    """)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the generated models (tens of GB)")
    parser.add_argument("--layers", type=int, action="append", help="depths (repeatable; default: 1 and 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", default=None, help="candidate types measured (default: the fork's 20)")
    parser.add_argument("--target-bpw", type=float, default=4.5)
    parser.add_argument("--store", action="store_true",
                        help="also write the plan as `tbpw run` does: each tensor quantized into a fresh tensor store, "
                             "the GGUF assembled from it")
    parser.add_argument("--keep", action="store_true", help="keep the generated models and outputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",")] if args.types else None
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for layers in sorted(args.layers or [1, 2]):
        d = args.work / f"L{layers}"
        d.mkdir(exist_ok=True)
        model, imatrix = d / "model.gguf", d / "model.imatrix.gguf"
        start = time.monotonic()
        specs = write_model(model, layers)
        write_imatrix(imatrix, layers)
        row: dict = {"layers": layers, "f16_bytes": model.stat().st_size,
                     "largest_tensor_bytes": max(s.n_bytes for s in specs),
                     "generate_seconds": round(time.monotonic() - start, 1)}
        print(f"L{layers}: wrote {row['f16_bytes'] / 1e9:.2f} GB in {row['generate_seconds']} s", flush=True)
        row["stock"] = stock(model, imatrix, d / "stock-q4km.gguf", args.threads)
        (d / "stock-q4km.gguf").unlink()
        print(f"L{layers}: stock {row['stock']['seconds']:.0f} s", flush=True)
        table = d / "table.json"
        row["measure"] = measure(model, imatrix, table, d / "cache", args.threads, types)
        print(f"L{layers}: measure {row['measure']['seconds']:.0f} s", flush=True)
        row["allocate"] = allocate(model, imatrix, table, d / "plan.json", args.target_bpw)
        row["quantize"] = quantize(model, imatrix, d / "plan.json", d / "tbpw.gguf", args.threads)
        print(f"L{layers}: quantize {row['quantize']['seconds']:.0f} s", flush=True)
        (d / "tbpw.gguf").unlink()
        if args.store:
            row["assemble"] = quantize(model, imatrix, d / "plan.json", d / "tbpw.gguf", args.threads, d / "store")
            print(f"L{layers}: assemble from the store {row['assemble']['seconds']:.0f} s", flush=True)
            shutil.rmtree(d / "store", ignore_errors=True)
        results.append(row)
        if not args.keep:
            for f in (model, d / "tbpw.gguf"):
                f.unlink(missing_ok=True)
            shutil.rmtree(d / "cache", ignore_errors=True)
        print(json.dumps(row), flush=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def print_table(results: list[dict]) -> None:
    gib = 1 << 20  # KiB per GiB
    print("\n| layers | F16 GB | largest tensor GB | stage | seconds | x stock | CPU x stock | peak RSS GiB | peak anon GiB "
          "| llama-quantize RSS GiB |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base, base_cpu = r["stock"]["seconds"], r["stock"]["cpu_seconds"]
        for stage in ("stock", "measure", "allocate", "quantize", "assemble"):
            s = r.get(stage)
            if s is None:
                continue
            print(f"| {r['layers']} | {r['f16_bytes'] / 1e9:.2f} | {r['largest_tensor_bytes'] / 1e9:.2f} | {stage} | "
                  f"{s['seconds']:.1f} | {s['seconds'] / base:.2f} | {s['cpu_seconds'] / base_cpu:.2f} | "
                  f"{s['hwm_kib'] / gib:.2f} | {s['anon_kib'] / gib:.2f} | "
                  f"{s['children_kib'] / gib:.2f} |")


if __name__ == "__main__":
    main()
