"""Speed of `tbpw measure` against one plain llama-quantize Q4_K_M run on the same model and threads.

    .venv/bin/python -m benchmarks.measure MODEL.gguf [--imatrix I.gguf] [--threads N] [--metric wmse]
        [--sampling default --sampling fork --sampling scale=0.25,sampled_share=1] [--synthetic 2048,5632,4]
        [--accuracy blk.1.]

For each sampling (`default`: tbpw's; `fork`: the fork's rows, sampled_share=1; or KEY=VALUE,... of
SamplingOptions) it runs, each in a fresh child process (so peak memory is per run):
  1. llama-quantize [--imatrix I] MODEL out.gguf Q4_K_M N          (the baseline)
  2. tbpw measure on an empty cache                                  (cold)
  3. tbpw measure again on that cache                                (warm)
and prints wall and CPU times, their ratios to the baseline, and peak resident memory.
`--accuracy PREFIX` then measures every row of the tensors whose names start with PREFIX (the exact errors) and
prints how far each sampling's errors are from them, and whether any tensor's candidates change order.
`--synthetic E,F,L` first writes a random F16 llama (hidden E, ffn F, L layers, the template's tokenizer)
next to MODEL, and an imatrix for it with llama-imatrix, then benchmarks that: the tiny model's rows all
fit the fork's sampling budget, so only a larger model shows what sampling buys.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.childmemory import monitor

REPO = Path(__file__).resolve().parent.parent


def timed_child(code: str) -> tuple[float, float, str]:
    """Run Python `code` in a child; (wall seconds, peak RSS MiB of it and its children, stdout)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = proc.communicate()
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err[-2000:]}")
    # the child waits for its own children, so its maxrss covers llama-quantize too
    peak = json.loads(out.strip().splitlines()[-1]).get("peak_mib", 0.0)
    return wall, peak, out


_MONITOR = monitor(0.02)  # benchmarks/childmemory.py: what the child reports and why
_PEAK = ("import resource, json; _anon[0] = max(_anon[0], _status('RssAnon')); "
         "r = max(_status('VmHWM'), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); anon = _anon[0]")


def baseline(model: Path, imatrix: Path | None, threads: int, work: Path) -> tuple[float, float, float, float]:
    args = [*(["--imatrix", str(imatrix)] if imatrix else []), str(model), str(work / "q4km.gguf"), "Q4_K_M", str(threads)]
    code = _MONITOR + textwrap.dedent(f"""
        from tbpw.llamacpp.tools import run_tool
        run = run_tool("llama-quantize", {args!r}, log_path={str(work / 'q4km.log')!r})
        {_PEAK}
        {_CPU}
        print(json.dumps({{"seconds": run.seconds, "cpu": cpu, "peak_mib": r / 1024}}))
    """)
    wall, peak, out = timed_child(code)
    info = json.loads(out.strip().splitlines()[-1])
    return wall, info["seconds"], info["cpu"], peak


SAMPLINGS = {"default": {}, "fork": {"sampled_share": 1.0}}


def sampling_options(spec: str) -> dict:
    if spec in SAMPLINGS:
        return SAMPLINGS[spec]
    out: dict = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = json.loads(value) if value.strip() not in ("true", "false") else value.strip() == "true"
    return out


_CPU = ("_own, _kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN); "
        "cpu = _own.ru_utime + _own.ru_stime + _kids.ru_utime + _kids.ru_stime")


def measure_run(model: Path, imatrix: Path | None, threads: int, metric: str, sampling: dict, cache: Path,
                tensors: list[str] | None = None) -> tuple[float, float, float, str, bool]:
    code = _MONITOR + textwrap.dedent(f"""
        import time
        from tbpw.measure.engine import measure
        start = time.monotonic()
        t = measure({str(model)!r}, {str(imatrix) if imatrix else None!r}, metric={metric!r}, threads={threads},
                    sampling={sampling!r}, cache_dir={str(cache)!r}, progress=False, tensors={tensors!r})
        {_PEAK}
        {_CPU}
        print(json.dumps({{"seconds": time.monotonic() - start, "cpu": cpu, "cached": t.meta["cached"],
                          "peak_mib": r / 1024, "anon_mib": anon / 1024, "key": t.meta["key"]}}))
    """)
    wall, peak, out = timed_child(code)
    info = json.loads(out.strip().splitlines()[-1])
    return (wall, info["seconds"], info["cpu"], f"{peak:7.1f} MiB ({info['anon_mib']:.1f} MiB anonymous)",
            info["cached"])


def make_synthetic(spec: str, template: Path, folder: Path) -> tuple[Path, Path]:
    from tbpw.llamacpp.tools import run_tool
    from testmodels.gguf_writers import write_llama_like

    n_embd, n_ff, n_layer = (int(v) for v in spec.split(","))
    model = folder / f"synthetic-{n_embd}x{n_ff}x{n_layer}.gguf"
    if not model.exists():
        write_llama_like(model, template, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, seed=1)
    imatrix = model.with_suffix(".imatrix.gguf")
    if not imatrix.exists():
        text = template.parent / "wiki-sample.txt"
        run_tool("llama-imatrix", ["-m", model, "-f", text, "-c", "128", "--chunks", "4", "-o", imatrix],
                 log_path=folder / "synthetic-imatrix.log")
    return model, imatrix


def accuracy(model: Path, imatrix: Path | None, threads: int, metric: str, samplings: list[str], prefix: str,
             work: Path) -> None:
    """How far each sampling's errors are from every row's, on the tensors named PREFIX..."""
    from tbpw.measure.table import ErrorTable
    from tbpw.model.inventory import ModelInventory

    names = [t.name for t in ModelInventory.load(model).tensors if t.quantizable and t.name.startswith(prefix)]
    exact_cache = work / "cache-all-rows"
    measure_run(model, imatrix, threads, metric, {"all_rows": True}, exact_cache, names)
    exact = ErrorTable.read_json(next(exact_cache.glob("*/table.json"))).by_name()
    print(f"accuracy on {len(names)} tensors ({prefix}*), against every row measured:")
    for spec in samplings:
        cache = work / f"cache-acc-{spec.replace('=', '-').replace(',', '_')}"
        measure_run(model, imatrix, threads, metric, sampling_options(spec), cache, names)
        table = ErrorTable.read_json(next(cache.glob("*/table.json"))).by_name()
        devs, reordered = [], 0
        for name in names:
            e = {c.type: c.error for c in exact[name].candidates}
            m = {c.type: c.error for c in table[name].candidates}
            devs += [abs(m[t] - e[t]) / e[t] for t in e if e[t] > 0]
            reordered += sorted(e, key=e.get) != sorted(m, key=m.get)
        devs.sort()
        print(f"  {spec:<10} median {100 * devs[len(devs) // 2]:.2f} %, 90th {100 * devs[int(0.9 * len(devs))]:.2f} %, "
              f"worst {100 * devs[-1]:.2f} % relative error; {reordered} of {len(names)} tensors change the order "
              "of their candidates")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--metric", default="wmse")
    ap.add_argument("--sampling", action="append", help="default, fork or KEY=VALUE,... (repeatable; default: default)")
    ap.add_argument("--accuracy", metavar="PREFIX", help="compare with every row measured on tensors named PREFIX...")
    ap.add_argument("--synthetic", help="E,F,L: benchmark a random llama of these widths instead (MODEL is its template)")
    ap.add_argument("--work", type=Path, help="folder for outputs (default: a temporary one)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="tbpw-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model, imatrix = a.model, a.imatrix
    if a.synthetic:
        model, imatrix = make_synthetic(a.synthetic, a.model, work)

    from tbpw.model.inventory import ModelInventory

    inv = ModelInventory.load(model)
    print(f"model {model.name}: {inv.n_elements / 1e6:.1f} M weights, {len(inv.tensors)} tensors; "
          f"imatrix {imatrix.name if imatrix else 'none'}; metric {a.metric}; {a.threads} threads; cpu count {os.cpu_count()}")
    b_wall, b_tool, b_cpu, b_peak = baseline(model, imatrix, a.threads, work)
    print(f"llama-quantize Q4_K_M: {b_tool:8.2f} s (tool), {b_wall:8.2f} s (with Python start), {b_cpu:8.2f} s CPU, "
          f"peak {b_peak:7.1f} MiB")
    samplings = a.sampling or ["default"]
    for spec in samplings:
        cache = work / f"cache-{spec.replace('=', '-').replace(',', '_')}"
        opts = sampling_options(spec)
        c_wall, c_in, c_cpu, c_peak, c_cached = measure_run(model, imatrix, a.threads, a.metric, opts, cache)
        w_wall, w_in, w_cpu, w_peak, w_cached = measure_run(model, imatrix, a.threads, a.metric, opts, cache)
        assert not c_cached and w_cached
        print(f"{spec:<12} cold: {c_in:8.2f} s in measure() / {c_wall:8.2f} s process = "
              f"{c_in / b_tool:6.2f}x / {c_wall / b_wall:6.2f}x the baseline; CPU {c_cpu:8.2f} s = {c_cpu / b_cpu:6.2f}x; "
              f"peak {c_peak}")
        print(f"{'':12} warm: {w_in:8.2f} s in measure() / {w_wall:8.2f} s process = "
              f"{w_in / b_tool:6.2f}x / {w_wall / b_wall:6.2f}x the baseline, peak {w_peak}")
    if a.accuracy:
        accuracy(model, imatrix, a.threads, a.metric, samplings, a.accuracy, work)


if __name__ == "__main__":
    main()
