"""The CUDA check, prepared here and run in one go on a GPU machine that has no network.

    python -m scripts.gpu_check prepare                  # here: fills .gpu/ (git-ignored) with what travels
    python -m scripts.gpu_check run --out DIR            # there (or here with --backend cpu, to test the script)

`prepare` cuts a slim llama.cpp source tree from tbpw's cache (the pinned sdist, ~8 MB compressed), downloads
the wheels the GPU image lacks (pydantic and gguf with their pure dependencies, for the machine's Python 3.12),
copies the tiny test models and text, and writes a HellaSwag-format task file. `run` installs tbpw and the
wheels, builds llama.cpp for CUDA (`tbpw build --backend cuda --source <slim tree>`, architectures from the
visible GPU), then on the tiny models times every tool with the model on the GPU (`-ngl 99`) and on the CPU
(`-ngl 0`, same binaries):

- both imatrix collectors (stock llama-imatrix and tbpw's collector), whose in_sum2 / in_sum / counts must
  agree between the two within float tolerance (the collector's device-buffer copy path runs only here);
- llama-quantize, KL divergence against the float model's logits, a HellaSwag-format task, llama-bench
  (pp512, tg128, pp1024+tg1024);
- the tiny recipe end to end with the CUDA build.

Everything it prints goes to files under --out: `gpu-check.json` (figures and pass/fail per check) and
`gpu-check.log`; tool logs are packed into `logs.tar.gz`. It exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".gpu"
PYTHON_TAG = "3.12"  # the GPU image's python3
# what the GPU image lacks (it has numpy, pyyaml, click, rich, pluggy, requests, tqdm, typing-extensions)
WHEELS = ("pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "gguf==0.19.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
IMATRIX_TOLERANCE = 2e-3  # relative: GPU and CPU sum activations in another order and precision


# ------------------------------------------------------------------------------------------- prepare


def prepare(folder: Path, shared: Path) -> None:
    from tbpw.data.taskformats import HellaSwagTask, write_hellaswag
    from tbpw.llamacpp import sources

    folder.mkdir(parents=True, exist_ok=True)
    src = sources.resolve(None)
    tree = sources.prepare(src)
    (tree / sources.ORIGIN_FILE).write_text(json.dumps(sources.origin_of(src)) + "\n")
    archive = folder / "llama.cpp.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="llama.cpp", filter=lambda info: None if info.name.endswith(".tbpw-complete") else info)
    wheels = folder / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_TAG, "--implementation", "cp", "-d", str(wheels), *WHEELS]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd, check=True)
    fixtures = shared / "fixtures" / "fork-tiny"
    for name in ("tiny-f16.gguf", "wiki-sample.txt"):
        shutil.copyfile(fixtures / name, folder / name)
    text = (fixtures / "wiki-sample.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.split()) > 40][:60]
    tasks = []
    for i, p in enumerate(paragraphs[:40]):
        words = p.split()
        endings = tuple(" ".join(paragraphs[(i + k) % len(paragraphs)].split()[20:32]) for k in range(4))
        tasks.append(HellaSwagTask(context=" ".join(words[:20]), endings=endings, gold=0))  # type: ignore[arg-type]
    write_hellaswag(tasks, folder / "tasks.hellaswag.txt")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"prepared {folder} ({size / 2**20:.1f} MiB): carry it with the device tool's `carry: [\".gpu\"]`")


# ----------------------------------------------------------------------------------------------- run


class Check:
    def __init__(self, out: Path):
        self.out = out
        self.results: dict = {"checks": {}, "timings": {}, "bench": {}, "notes": []}
        self.log_file = open(out / "gpu-check.log", "a", encoding="utf-8")

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def record(self, name: str, ok: bool, detail: str = "") -> None:
        self.results["checks"][name] = {"ok": ok, "detail": detail}
        self.say(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        self.save()

    def save(self) -> None:
        (self.out / "gpu-check.json").write_text(json.dumps(self.results, indent=1))


def _timed(fn, *args, **kwargs):
    start = time.monotonic()
    value = fn(*args, **kwargs)
    return value, time.monotonic() - start


def _compare_imatrices(a: Path, b: Path) -> tuple[bool, str]:
    import numpy as np

    from tbpw.imatrix.reader import Imatrix

    x, y = Imatrix.load(a), Imatrix.load(b)
    worst = 0.0
    names = sorted(x.entries)
    if names != sorted(y.entries):
        return False, "different tensors"
    for name in names:
        ex, ey = x.entries[name], y.entries[name]
        pairs = [(ex.in_sum2, ey.in_sum2), (ex.counts, ey.counts)]
        if ex.in_sum is not None or ey.in_sum is not None:
            if ex.in_sum is None or ey.in_sum is None:
                return False, f"{name}: in_sum in one file only"
            pairs.append((ex.in_sum, ey.in_sum))
        for u, v in pairs:
            u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
            scale = np.maximum(np.abs(u), np.abs(v)).max() or 1.0
            worst = max(worst, float(np.abs(u - v).max() / scale))
    return worst <= IMATRIX_TOLERANCE, f"largest difference {worst:.2e} of the largest value (tolerance {IMATRIX_TOLERANCE})"


def run(folder: Path, out: Path, backend: str, jobs: int | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "tbpw-gpu-check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if backend != "cpu":  # a fresh cache on the GPU machine; the CPU test uses this machine's build
        os.environ.setdefault("TBPW_HOME", str(work / "home"))
    from tbpw.llamacpp.bench import bench, speeds
    from tbpw.llamacpp.build import active_build
    from tbpw.llamacpp.collector import install
    from tbpw.llamacpp.imatrix import make_imatrix
    from tbpw.llamacpp.perplexity import base_logits, kld, task
    from tbpw.llamacpp.quantize import quantize

    if backend == "cpu":
        build = active_build()
        check.say(f"using the active build {build.key} ({build.backend}): testing the script itself")
    else:
        tree = work / "src"
        with tarfile.open(folder / "llama.cpp.tar.gz") as tar:
            tar.extractall(tree, filter="data")
        build, seconds = _timed(install, str(tree / "llama.cpp"), backend, jobs)
        check.results["timings"]["build"] = seconds
        check.say(f"built {build.key} ({build.backend}, {' '.join(build.cmake_flags[-3:])}) in {seconds:.0f} s")
    check.results["build"] = build.to_json()
    model, text = folder / "tiny-f16.gguf", folder / "wiki-sample.txt"
    layers = {"gpu": 99, "cpu": 0}

    def both(label: str, fn) -> dict:
        """Run fn(ngl, tag) with the model on the GPU and on the CPU; record both times and their ratio."""
        values, times = {}, {}
        for where, ngl in layers.items():
            values[where], times[where] = _timed(fn, ngl, where)
        check.results["timings"][label] = {**times, "gpu/cpu": times["gpu"] / times["cpu"]}
        check.say(f"{label}: GPU {times['gpu']:.2f} s, CPU {times['cpu']:.2f} s (ratio {times['gpu'] / times['cpu']:.3f})")
        return values

    try:
        for collector in ("stock", "tbpw"):
            files = both(f"imatrix-{collector}", lambda ngl, where, c=collector: make_imatrix(
                model, text, work / f"{c}-{where}.imatrix.gguf", collector=c, ctx=256, chunks=16, ngl=ngl,
                log_path=work / f"{c}-{where}.imatrix.log").path)
            ok, detail = _compare_imatrices(files["gpu"], files["cpu"])
            check.record(f"imatrix {collector}: GPU equals CPU", ok, detail)
        imatrix = work / "tbpw-gpu.imatrix.gguf"
        q4, seconds = _timed(quantize, model, work / "q4_k_m.gguf", imatrix=imatrix, base_type="Q4_K_M",
                             log_path=work / "quantize.log")
        check.results["timings"]["quantize"] = seconds
        check.record("llama-quantize Q4_K_M with the GPU imatrix", (work / "q4_k_m.gguf").is_file())
        bases = both("base-logits", lambda ngl, where: base_logits(
            model, text, work / f"base-{where}.logits", ctx=256, chunks=8, ngl=ngl, log_path=work / f"base-{where}.log"))
        scores = both("kld", lambda ngl, where: kld(work / "q4_k_m.gguf", bases[where], ngl=ngl,
                                                     log_path=work / f"kld-{where}.log"))
        check.results["kld"] = {k: v.to_json() for k, v in scores.items()}
        diff = abs(scores["gpu"].kld_mean - scores["cpu"].kld_mean)
        check.record("KLD on the GPU matches the CPU", diff <= 0.05 * max(scores["cpu"].kld_mean, 1e-6),
                     f"GPU {scores['gpu'].kld_mean:.6f}, CPU {scores['cpu'].kld_mean:.6f}")
        tasks = both("hellaswag", lambda ngl, where: task(work / "q4_k_m.gguf", "hellaswag", folder / "tasks.hellaswag.txt",
                                                           tasks=40, ctx=256, ngl=ngl, log_path=work / f"hellaswag-{where}.log"))
        check.record("HellaSwag-format task on the GPU", abs(tasks["gpu"].acc_norm_pct - tasks["cpu"].acc_norm_pct) <= 5.0,
                     f"GPU {tasks['gpu'].acc_norm_pct:.1f}%, CPU {tasks['cpu'].acc_norm_pct:.1f}%")
        for where, ngl in layers.items():
            result = bench(work / "q4_k_m.gguf", pp=512, tg=128, pg=(1024, 1024), repetitions=3, ngl=ngl,
                           log_path=work / f"bench-{where}.log")
            rows = [{k: v for k, v in t.__dict__.items() if k != "raw"} for t in result.tests]
            check.results["bench"][where] = {"speeds": speeds(result), "rows": rows}
            check.say(f"llama-bench ({where}): " + ", ".join(f"{k} {v:.0f} t/s" for k, v in speeds(result).items()))
        check.record("llama-bench -ngl 99", bool(check.results["bench"]["gpu"]["speeds"]))
        recipe_out = work / "recipe"
        sets = [f"model.gguf={model}", f"datasets.calibration.options.path={text}",
                f"datasets.evaluation.options.path={text}", f"output_dir={recipe_out}", "imatrix.collector=tbpw"]
        cmd = [sys.executable, "-m", "tbpw.cli", "run", str(REPO / "tests" / "recipes" / "tiny.yaml"),
               *[a for s in sets for a in ("--set", s)]]
        proc, seconds = _timed(subprocess.run, cmd, capture_output=True, text=True)
        (work / "recipe.log").write_text(proc.stdout + proc.stderr)
        check.results["timings"]["tiny-recipe"] = seconds
        check.record("the tiny recipe end to end", proc.returncode == 0, f"{seconds:.0f} s, exit {proc.returncode}")
    except Exception as exc:  # a broken check must still leave its files
        check.record("no unexpected error", False, f"{type(exc).__name__}: {exc}")
    finally:
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for log in sorted(work.rglob("*.log")):
                tar.add(log, arcname=str(log.relative_to(work)))
        check.save()
    failed = [n for n, c in check.results["checks"].items() if not c["ok"]]
    check.say(f"{len(check.results['checks']) - len(failed)} checks passed, {len(failed)} failed")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("TBPW_SHARED", REPO.parent / "shared")))
    r = sub.add_parser("run")
    r.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    r.add_argument("--backend", default="cuda", choices=("cuda", "cpu"))
    r.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dir, args.shared)
    else:
        sys.exit(run(args.dir, args.out, args.backend, args.jobs))


if __name__ == "__main__":
    main()
