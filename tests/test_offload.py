"""On a GPU build every llama.cpp run that loads a model offloads it: the whole `tbpw run` recorded.

The build record says CUDA while its tools are the CPU build's (llama.cpp warns that no GPU is usable and
runs on the CPU), so the command lines are the ones a CUDA build would get, and the run still finishes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.llamacpp import tools
from tbpw.llamacpp.build import BuildInfo
from tbpw.llamacpp.imatrix import imatrix_args
from tbpw.llamacpp.offload import gpu_layers, offload_args

RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"
# the tools that load a model, and the one that never does (llama-quantize is CPU code)
LOADS_MODEL = {"llama-perplexity", "llama-imatrix", "tbpw-collector", "llama-bench"}

pytestmark = pytest.mark.tools


def _build_record(active: BuildInfo, root: Path, backend: str) -> BuildInfo:
    root.mkdir()
    (root / "bin").symlink_to(active.bin_dir, target_is_directory=True)
    data = json.loads((active.root / "build.json").read_text())
    (root / "build.json").write_text(json.dumps({**data, "backend": backend}))
    return BuildInfo.load(root)


def test_gpu_layers_follow_the_backend_unless_the_recipe_says(tmp_path, active_build):
    cpu = _build_record(active_build, tmp_path / "cpu", "cpu")
    cuda = _build_record(active_build, tmp_path / "cuda", "cuda")
    assert offload_args(cpu) == [] and gpu_layers(cpu) is None
    assert offload_args(cuda) == ["-ngl", "99"]
    assert offload_args(cuda, 12) == ["-ngl", "12"] and offload_args(cpu, 0) == ["-ngl", "0"]
    # both imatrix collectors take this one argument list
    args = imatrix_args(Path("m.gguf"), "t.txt", Path("o.gguf"), ctx=128, chunks=2, threads=None, build=cuda)
    assert args[args.index("-ngl") + 1] == "99"


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, active_build, tiny_model, wiki_text):
    """The tiny recipe with every stage that runs a tool (calibrate, choose with refinement, tasks left out,
    bench on, tbpw's collector) on a build recorded as CUDA, with `ngl: 7`; every command line it ran."""
    work = tmp_path_factory.mktemp("offload")
    record = _build_record(active_build, work / "cuda-build", "cuda")
    out = work / "tiny"
    sets = [f"model.gguf={tiny_model}", f"datasets.calibration.options.path={wiki_text}",
            f"datasets.evaluation.options.path={wiki_text}", f"output_dir={out}", "ngl=7",
            "imatrix.collector=tbpw", "targets=[{bpw: 3.5}]", "compare_stock=[Q4_K_M]",
            "allocators=[{name: knapsack}]", "bench={pp: 16, tg: 4, pg: null, repetitions: 1}",
            "calibrate={grouping: role, ctx: 128, chunks: 2, strengths: [1.0]}",
            "choose={ctx: 128, chunks: 2, refine_rounds: 1, refine_tries: 1}"]
    commands: list[list[str]] = []
    real_launch = tools.launch

    def spy_launch(argv, *args, **kwargs):  # every llama.cpp tool (and tbpw's collector) starts here
        if Path(str(argv[0])).name in LOADS_MODEL | {"llama-quantize"}:
            commands.append([str(a) for a in argv])
        return real_launch(argv, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TBPW_BUILD", str(record.root))
        mp.setenv("TBPW_SENSITIVITY_CACHE", str(work / "sensitivity"))
        mp.setattr(tools, "launch", spy_launch)
        result = CliRunner().invoke(main, ["run", str(RECIPE), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    shutil.rmtree(record.root / "logs", ignore_errors=True)
    return commands


@pytest.mark.slow
def test_every_run_that_loads_the_model_offloads_the_recipes_layers(cuda_run):
    tools = {Path(argv[0]).name for argv in cuda_run}
    # one imatrix collector per run: the recipe asks for tbpw's (stock llama-imatrix shares its arguments)
    assert LOADS_MODEL - {"llama-imatrix"} <= tools, f"the run should have used every kind of tool, used {sorted(tools)}"
    for argv in cuda_run:
        tool = Path(argv[0]).name
        if tool in LOADS_MODEL and "-m" in argv:  # --help and --version probes load nothing
            assert "-ngl" in argv and argv[argv.index("-ngl") + 1] == "7", " ".join(argv)
        else:
            assert "-ngl" not in argv, " ".join(argv)
    # the KL divergence runs of calibrate, choose and refine are among them, not only the evaluation's
    kld_runs = [argv for argv in cuda_run if "--kl-divergence" in argv]
    assert len(kld_runs) >= 5, f"{len(kld_runs)} KLD runs"
