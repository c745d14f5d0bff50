"""The flagship recipe end to end on the synthetic Gemma-4-26B-A4B: every stage of `recipes/gemma4-q4.yaml` on the
real tensor layout, at reduced depth, with tbpw's offline datasets in place of the hub's.

    .venv/bin/python -m benchmarks.flagship --work DIR [--layers 2] [--targets 4.5] [--stock Q4_K_M] [--tasks 4]

- The model: `testmodels/synthetic_gemma4.py` at `--layers` (every tensor at its real name, shape and type; 2
  layers are 4.8 GB of F16, the 262,144 x 2816 embedding and output included; llama.cpp runs no Gemma 4 without a
  sliding-window layer, and the last kept layer is a full-attention one, so 2 is the least), with the tiny Gemma 4 fixture's
  gemma4 BPE tokenizer (converted by the pinned convert_hf_to_gguf.py) padded to the model's vocabulary, so
  llama-perplexity, llama-imatrix and llama-bench load it. Its weights are random: the numbers measure cost
  and exercise every stage, not quality.
- The recipe: `recipes/gemma4-q4.yaml` as it is (metric, allocators, calibrate per role, choose with screening,
  `evaluation.scope: selected`, `keep: chosen`, the six evaluators, llama-bench, the selection rule), with
  `--set` only for what this machine cannot do: the model (`{gguf: ...}` for the hub's), the datasets (tbpw's
  offline Wikipedia split and labelled substitutes for the hub's benchmarks), and smaller counts (targets, stock
  types, chunks, tasks, bench lengths) so that it runs in well under an hour on 2 CPU cores.
- The check: the run ends with a report whose entries carry the MoE type maps (`ffn_gate_up_exps`,
  `ffn_down_exps` in the selected quant's types), the plans not kept are deleted, and every stage's wall time
  (from its manifest) is printed as a table for docs/results/scale.md.

Nothing is committed: the model, its imatrix and the run live in --work (deleted at the end unless --keep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from testmodels.synthetic_gemma4 import padded_tokenizer, write_model

REPO = Path(__file__).resolve().parent.parent

TINY_MOE = REPO / "tests" / "fixtures" / "tiny-moe-hf"
RECIPE = REPO / "recipes" / "gemma4-q4.yaml"


def tokenizer_source(work: Path) -> Path:
    """The tiny Gemma 4 fixture as the pinned converter writes it: its tokenizer is what the model borrows."""
    from tbpw.llamacpp.convert import convert_hf

    out = work / "tiny-moe-f16.gguf"
    if not out.is_file():
        convert_hf(TINY_MOE, out, outtype="f16", log_path=work / "convert.log")
    return out


def overrides(model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    tasks = args.tasks
    offline = {"calibration": f"{{name: demo-wiki, options: {{split: calibration, take_tokens: {args.cal_tokens}}}}}",
               "evaluation": f"{{name: demo-wiki, options: {{split: evaluation, take_tokens: {args.eval_tokens}}}}}",
               "hellaswag": "{name: substitute-hellaswag}", "winogrande": "{name: substitute-winogrande}",
               "arc": "{name: substitute-arc}", "mmlu": "{name: demo-mmlu}", "truthfulqa": "{name: substitute-truthfulqa}"}
    sets = [f"model={{gguf: {model}}}", f"output_dir={out}",
            *(f"datasets.{role}={value}" for role, value in offline.items()),
            f"imatrix.chunks={args.cal_chunks}",
            "targets=[" + ", ".join(f"{{bpw: {t}}}" for t in args.targets.split(",")) + "]",
            f"compare_stock=[{args.stock}]",
            f"calibrate.chunks={args.cal_chunks}",
            f"choose={{chunks: {args.cal_chunks}, screen_chunks: 0, finalists: 2}}",
            f"evaluation.chunks={args.eval_chunks}",
            "evaluators=[{name: kld}, "
            f"{{name: hellaswag, options: {{tasks: {tasks}}}}}, {{name: winogrande, options: {{tasks: {tasks}}}}}, "
            f"{{name: multiple-choice, options: {{dataset: arc, tasks: {tasks}}}}}, "
            f"{{name: multiple-choice, options: {{dataset: mmlu, tasks: {tasks}}}}}, "
            f"{{name: multiple-choice, options: {{dataset: truthfulqa, tasks: {tasks}}}}}]",
            "bench={pp: 64, tg: 8, pg: null, repetitions: 1}"]
    return [a for s in sets for a in ("--set", s)]


def stage_times(run: Path) -> list[tuple[str, float]]:
    rows = []
    for manifest in sorted(run.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime):
        data = json.loads(manifest.read_text())
        rows.append((data["stage"], float(data.get("seconds", 0.0))))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="a folder with room for the model (3.1 GB per layer) and the run")
    p.add_argument("--layers", type=int, default=2, help="at least 2: a sliding-window layer and a full one")
    p.add_argument("--targets", default="4.5", help="bpw targets, comma-separated (the recipe has seven)")
    p.add_argument("--stock", default="Q4_K_M", help="stock types to compare, comma-separated")
    p.add_argument("--tasks", type=int, default=4, help="tasks per task benchmark (the recipe: 750)")
    p.add_argument("--cal-chunks", type=int, default=2, help="imatrix, calibration and choice chunks")
    p.add_argument("--eval-chunks", type=int, default=1)
    p.add_argument("--cal-tokens", type=int, default=4000)
    p.add_argument("--eval-tokens", type=int, default=2000)
    p.add_argument("--keep", action="store_true", help="keep the model and the run in --work")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / f"gemma4-26b-a4b-{args.layers}L.gguf"
    start = time.monotonic()
    if not model.is_file():
        write_model(model, args.layers, tokenizer=padded_tokenizer(tokenizer_source(args.work)), progress=True)
    print(f"model: {model} ({model.stat().st_size / 1e9:.2f} GB, {time.monotonic() - start:.0f} s to write)")
    run = args.work / "run"
    tbpw = [sys.executable, "-m", "tbpw.cli"]
    plan = subprocess.run([*tbpw, "run", str(RECIPE), *overrides(model, run, args), "--plan"], text=True,
                          capture_output=True, check=False)
    print(plan.stdout + plan.stderr)
    start = time.monotonic()
    done = subprocess.run([*tbpw, "run", str(RECIPE), *overrides(model, run, args)], check=False)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"tbpw run failed (exit {done.returncode}); the run is in {run}")
    report = json.loads((run / "report" / "report.json").read_text())
    selected = [e for e in report["entries"] if e.get("selected")]
    moe = {name: qtype for e in selected for name, qtype in e["types"].items() if "_exps" in name}
    released = [e["name"] for e in report["entries"] if e.get("released")]
    print(f"\nflagship recipe on the synthetic model, {args.layers} layer(s): {seconds:.0f} s in all\n")
    print("| stage | wall s |\n|---|---:|")
    for stage, secs in stage_times(run):
        print(f"| {stage} | {secs:.1f} |")
    print(f"\nselected: {', '.join(e['name'] for e in selected)}; expert tensor types: "
          + ", ".join(f"{n}={t}" for n, t in sorted(moe.items())))
    print(f"deleted after evaluation (keep: chosen): {', '.join(released) or 'none'}")
    print(f"model card: {run / 'report' / 'README.md'}")
    if not moe or not released:
        raise SystemExit("the report lacks the MoE type maps or the deleted plans")
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
