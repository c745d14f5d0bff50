"""Speed of `tbpw measure` against one plain llama-quantize Q4_K_M run on the same model and threads.

    .venv/bin/python benchmarks/measure.py MODEL.gguf [--imatrix I.gguf] [--threads N] [--metric wmse]
        [--scale 1 --scale 0.125] [--synthetic 2048,5632,4]

For each sampling scale it runs, each in a fresh child process (so peak memory is per run):
  1. llama-quantize [--imatrix I] MODEL out.gguf Q4_K_M N          (the baseline)
  2. tbpw measure on an empty cache                                  (cold)
  3. tbpw measure again on that cache                                (warm)
and prints wall times, their ratios to the baseline, and peak resident memory.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # gguf_writers: the same random-llama writer the tests use


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


# VmHWM is this process's own peak RSS (ru_maxrss would include what the parent held when it forked);
# RUSAGE_CHILDREN covers the children it waited for (llama-quantize). A thread samples RssAnon, since the
# RSS of a measurement is mostly clean pages of the memory-mapped model, which the kernel can drop.
_MONITOR = textwrap.dedent("""
    import re, threading, time
    def _status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    _anon = [0]
    def _watch():
        while True:
            _anon[0] = max(_anon[0], _status("RssAnon"))
            time.sleep(0.02)
    threading.Thread(target=_watch, daemon=True).start()
""")
_PEAK = ("import resource, json; _anon[0] = max(_anon[0], _status('RssAnon')); "
         "r = max(_status('VmHWM'), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); anon = _anon[0]")


def baseline(model: Path, imatrix: Path | None, threads: int, work: Path) -> tuple[float, float, float]:
    args = [*(["--imatrix", str(imatrix)] if imatrix else []), str(model), str(work / "q4km.gguf"), "Q4_K_M", str(threads)]
    code = _MONITOR + textwrap.dedent(f"""
        from tbpw.llamacpp.tools import run_tool
        run = run_tool("llama-quantize", {args!r}, log_path={str(work / 'q4km.log')!r})
        {_PEAK}
        print(json.dumps({{"seconds": run.seconds, "peak_mib": r / 1024}}))
    """)
    wall, peak, out = timed_child(code)
    return wall, json.loads(out.strip().splitlines()[-1])["seconds"], peak


def measure_run(model: Path, imatrix: Path | None, threads: int, metric: str, scale: float, cache: Path) -> tuple[float, float, str, bool]:
    code = _MONITOR + textwrap.dedent(f"""
        import time
        from tbpw.measure import measure
        start = time.monotonic()
        t = measure({str(model)!r}, {str(imatrix) if imatrix else None!r}, metric={metric!r}, threads={threads},
                    sampling={{"scale": {scale}}}, cache_dir={str(cache)!r}, progress=False)
        {_PEAK}
        print(json.dumps({{"seconds": time.monotonic() - start, "cached": t.meta["cached"], "peak_mib": r / 1024, "anon_mib": anon / 1024}}))
    """)
    wall, peak, out = timed_child(code)
    info = json.loads(out.strip().splitlines()[-1])
    return wall, info["seconds"], f"{peak:7.1f} MiB ({info['anon_mib']:.1f} MiB anonymous)", info["cached"]


def make_synthetic(spec: str, template: Path, folder: Path) -> tuple[Path, Path]:
    from gguf_writers import write_llama_like

    from tbpw.llamacpp.tools import run_tool

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--metric", default="wmse")
    ap.add_argument("--scale", type=float, action="append", help="sampling scale(s) to time (default 1)")
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
    b_wall, b_tool, b_peak = baseline(model, imatrix, a.threads, work)
    print(f"llama-quantize Q4_K_M: {b_tool:8.2f} s (tool), {b_wall:8.2f} s (with Python start), peak {b_peak:7.1f} MiB")
    for scale in a.scale or [1.0]:
        cache = work / f"cache-{scale}"
        c_wall, c_in, c_peak, c_cached = measure_run(model, imatrix, a.threads, a.metric, scale, cache)
        w_wall, w_in, w_peak, w_cached = measure_run(model, imatrix, a.threads, a.metric, scale, cache)
        assert not c_cached and w_cached
        print(f"scale {scale:<6} cold: {c_in:8.2f} s in measure() / {c_wall:8.2f} s process = "
              f"{c_in / b_tool:6.2f}x / {c_wall / b_wall:6.2f}x the baseline, peak {c_peak}")
        print(f"{'':12} warm: {w_in:8.2f} s in measure() / {w_wall:8.2f} s process = "
              f"{w_in / b_tool:6.2f}x / {w_wall / b_wall:6.2f}x the baseline, peak {w_peak}")


if __name__ == "__main__":
    main()
