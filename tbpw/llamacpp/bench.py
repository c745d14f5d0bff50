"""llama-bench: the one place that writes its arguments. The model is offloaded like every other run."""

from __future__ import annotations

from pathlib import Path

from tbpw.llamacpp import parsers, progress, resources
from tbpw.llamacpp.build import BuildInfo, active_build
from tbpw.llamacpp.offload import gpu_layers
from tbpw.llamacpp.tools import run_tool


def bench(model: Path | str, *, pp: int, tg: int, pg: tuple[int, int] | None = None, repetitions: int = 5,
          threads: int | None = None, ngl: int | None = None, log_path: Path | str | None = None,
          build: BuildInfo | None = None) -> parsers.BenchResult:
    """Prompt processing (`pp` tokens), generation (`tg`) and optionally both in one test (`pg`)."""
    build = build or active_build()
    args = ["-m", str(model), "-p", str(pp), "-n", str(tg), "-r", str(repetitions), "-o", "json", "--progress"]
    if pg:
        args += ["-pg", f"{pg[0]},{pg[1]}"]
    if threads := resources.threads(threads):
        args += ["-t", str(threads)]
    # llama-bench's own default offloads everything on a GPU build; say so either way, so the log is explicit
    args += ["-ngl", str(gpu_layers(build, ngl) or 0)]
    run = run_tool("llama-bench", args, log_path=log_path, build=build, meter=progress.BENCH)
    return parsers.parse_run(parsers.parse_bench_json, run)


def speeds(result: parsers.BenchResult) -> dict[str, float]:
    """Tokens per second by test label as the model card writes them: pp512, tg128, pp1024+tg1024."""
    out = {}
    for test in result.tests:
        label = (f"pp{test.n_prompt}+tg{test.n_gen}" if test.n_prompt and test.n_gen else
                 f"pp{test.n_prompt}" if test.n_prompt else f"tg{test.n_gen}")
        out[label] = test.avg_ts
    return out


_CPU_BACKENDS = ("CPU", "BLAS", "ZenDNN")
# the columns of llama-bench's own table, in its order (ngl for GPU backends, threads for CPU ones)
MARKDOWN_COLUMNS = ("model", "size", "params", "backend", "ngl", "threads", "test", "t/s")


def markdown_rows(result: parsers.BenchResult) -> list[dict[str, str]]:
    """Each test as llama-bench's own table (`-o md`) writes it: model, size, params, backend, ngl (GPU backends),
    threads (CPU backends), test and t/s (mean ± standard deviation), in llama-bench's formats."""
    rows = []
    for test in result.tests:
        gib = test.model_size >= 1 << 30
        row = {"model": test.model_type,
               "size": f"{test.model_size / (1 << 30):.2f} GiB" if gib else f"{test.model_size / (1 << 20):.2f} MiB",
               "params": f"{test.model_n_params / 1e9:.2f} B" if test.model_n_params >= 10**9
               else f"{test.model_n_params / 1e6:.2f} M",
               "backend": test.backends}
        cpu = any(name in test.backends for name in _CPU_BACKENDS)
        if not cpu:
            row["ngl"] = str(test.n_gpu_layers)
        else:
            row["threads"] = str(test.n_threads)
        row["test"] = test.name
        row["t/s"] = f"{test.avg_ts:.2f} ± {test.stddev_ts:.2f}"
        rows.append(row)
    return rows
