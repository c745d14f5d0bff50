"""llama-bench: the one place that writes its arguments. The model is offloaded like every other run."""

from __future__ import annotations

from pathlib import Path

from tbpw.llamacpp import parsers, resources
from tbpw.llamacpp.build import BuildInfo, active_build
from tbpw.llamacpp.offload import gpu_layers
from tbpw.llamacpp.tools import run_tool


def bench(model: Path | str, *, pp: int, tg: int, pg: tuple[int, int] | None = None, repetitions: int = 5,
          threads: int | None = None, ngl: int | None = None, log_path: Path | str | None = None,
          build: BuildInfo | None = None) -> parsers.BenchResult:
    """Prompt processing (`pp` tokens), generation (`tg`) and optionally both in one test (`pg`)."""
    build = build or active_build()
    args = ["-m", str(model), "-p", str(pp), "-n", str(tg), "-r", str(repetitions), "-o", "json"]
    if pg:
        args += ["-pg", f"{pg[0]},{pg[1]}"]
    if threads := resources.threads(threads):
        args += ["-t", str(threads)]
    # llama-bench's own default offloads everything on a GPU build; say so either way, so the log is explicit
    args += ["-ngl", str(gpu_layers(build, ngl) or 0)]
    return parsers.parse_run(parsers.parse_bench_json, run_tool("llama-bench", args, log_path=log_path, build=build))


def speeds(result: parsers.BenchResult) -> dict[str, float]:
    """Tokens per second by test label as the model card writes them: pp512, tg128, pp1024+tg1024."""
    out = {}
    for test in result.tests:
        label = (f"pp{test.n_prompt}+tg{test.n_gen}" if test.n_prompt and test.n_gen else
                 f"pp{test.n_prompt}" if test.n_prompt else f"tg{test.n_gen}")
        out[label] = test.avg_ts
    return out
