#!/usr/bin/env python3
"""Quality at equal size: `tbpw run` against stock llama.cpp (and the target-bpw fork) by KL divergence.

    .venv/bin/python -m benchmarks.quality [--model bench|bench-odd|PATH] [--levels IQ3_XXS,Q2_K,...]
        [--set KEY.PATH=VALUE ...] [--label NAME] [--fork-build BUILD_DIR] [--chunks 100] [--ctx N]
        [--work DIR] [--out docs/results/quality.md] [--json FILE]

Every tbpw row is a quant of one `tbpw run` of a recipe this benchmark writes into `--work` and prints in its
section: its targets are the stock types of `--levels` (`targets: [{stock: Q2_K}, ...]`, so each level's stock
file is a quant of the same run and tbpw's plan is made at its exact size), its imatrix (tbpw's collector, E[a²]
and E[a]) and its calibration read the CALIBRATION side of tbpw's Wikipedia split, and its evaluation (the `kld`
evaluator) reads the held-out EVALUATION side. Its `calibrate:` and `choose:` are the recipes' defaults; a variant
is a recipe override (`--set calibrate.grouping=tensor --set choose.refine_rounds=2`), written into the section.

The fork's rows: with `--fork-build` (a build folder of the target-bpw fork, `tbpw build --source PATH` with
TBPW_HOME elsewhere, so that the stock build stays active), the fork's `llama-quantize --target-bpw` at each level's
stock bpw, with the run's own imatrix and one `--state-file` for all levels (the first level measures, the others
reuse), is added to the same run as `compare_files` and evaluated by it like its own quants (the run is started
again with them: its finished stages are reused).

Times are multiples of one plain stock Q4_K_M quantization of the model: a stage's time is its manifest's, the
choice's includes writing and scoring its candidates, and the one-off stages (imatrix, measure, calibrate) are
listed below the table. `--json` writes the rows and each level's choice (its candidates' calibration scores).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

DEFAULT_LEVELS = ("IQ3_XXS", "Q2_K", "Q3_K_M", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K")
BENCH_MODELS = ("bench", "bench-odd")
# The quality targets of the chosen plan: KLD / min(stock, fork) per level and their geometric mean; without
# fork rows, KLD / stock.
TARGETS_WITH_FORK = (0.85, 0.70)
TARGETS_STOCK_ONLY = (0.60, 0.45)
ONE_OFF = ("imatrix", "measure", "calibrate")
ANCHOR = "<!-- tbpw-run-sections -->"  # where a results page puts a section it does not have yet


@dataclass
class Row:
    level: str
    variant: str  # stock, fork, or the tbpw quant's stage name
    bpw: float
    metrics: dict[str, float]
    seconds: float | None
    note: str = ""


@dataclass
class Result:
    model: str
    recipe: str  # the recipe as written, then the overrides
    rows: list[Row] = field(default_factory=list)
    targets: dict[str, float] = field(default_factory=dict)  # level -> the stock file's bpw
    stock_seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)  # one-off stage -> seconds
    notes: list[str] = field(default_factory=list)
    choices: dict[str, dict] = field(default_factory=dict)  # level -> the choose stage's result


def log(line: str) -> None:
    print(line, flush=True)


def resolve_model(spec: str) -> tuple[Path, str, list[str]]:
    """(F16 GGUF, display name, notes printed next to the numbers)."""
    if spec in BENCH_MODELS:
        from testmodels.training.bench_model import MODELS, bench_model, settings_for

        bm = bench_model(settings=settings_for("cpu", MODELS[spec]), log=log)
        m, st = bm.manifest, bm.manifest["settings"]
        return bm.gguf, spec, [
            f"benchmark model: tbpw's trained llama ({m['parameters'] / 1e6:.2f} M parameters, genuine float weights; "
            f"hidden {st['hidden']}, {st['layers']} layers, {st['heads']} heads / {st['kv_heads']} KV heads, "
            f"ffn {st['ffn']}; held-out PPL {m['heldout_ppl']}, {m['tokens_seen'] / 1e6:.2f} M tokens seen in "
            f"{m['train_seconds'] / 60:.1f} min on 2 CPU threads; settings key {m['key']})"]
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"error: no model {spec!r}: use {', '.join(BENCH_MODELS)} or the path of an F16/BF16 GGUF "
                         "with genuine float weights")
    return path, path.stem, []


def public_model(spec: str, model: Path) -> str:
    """The model as the section prints it: a bench model by where tbpw keeps it, a given file by its name."""
    if spec in BENCH_MODELS:
        return f"$TBPW_HOME/{model.parent.parent.name}/{model.parent.name}/{model.name}"
    return model.name


LOCAL_FLAGS = {"--work", "--json", "--out"}  # where this machine put things: not part of what made the numbers


def public_argv(argv: list[str]) -> list[str]:
    """The command line a reader can run: the fork's build folder as a placeholder, this machine's folders left out."""
    shown: list[str] = []
    skip = False
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif flag in LOCAL_FLAGS:
            skip = "=" not in arg
        elif flag == "--fork-build":
            shown += ["--fork-build", "FORK_BUILD_DIR"]
            skip = "=" not in arg
        else:
            shown.append(arg)
    return shown


def recipe_text(label: str, model: Path, levels: list[str], ctx: int, chunks: int, imatrix_chunks: int,
                threads: int) -> str:
    """The recipe every tbpw row comes from (before `--set`)."""
    recipe = {
        "name": f"quality-{label}",
        "description": "benchmarks/quality.py: tbpw's chosen plan at the exact size of each stock type",
        "model": {"gguf": str(model)},
        "datasets": {"calibration": {"name": "demo-wiki", "options": {"split": "calibration"}},
                     "evaluation": {"name": "demo-wiki", "options": {"split": "evaluation"}}},
        "imatrix": {"collector": "tbpw", "ctx": ctx, "chunks": imatrix_chunks},
        "measure": {"metric": {"name": "wmse"}, "threads": threads},
        "targets": [{"stock": level} for level in levels],
        "allocators": [{"name": "knapsack"}, {"name": "lagrangian"}],
        "calibrate": {"ctx": ctx},
        "choose": {"ctx": ctx},
        "evaluators": [{"name": "kld"}],
        "evaluation": {"ctx": ctx, "chunks": chunks, "threads": threads},
        "bench": {"enabled": False},
    }
    return yaml.safe_dump(recipe, sort_keys=False)


def tbpw_run(recipe: Path, sets: list[str], log_path: Path, verbose: bool) -> None:
    """`tbpw run RECIPE --set ...`, as a user runs it."""
    command = [sys.executable, "-m", "tbpw.cli", "run", str(recipe), *(a for s in sets for a in ("--set", s))]
    log("$ tbpw run " + " ".join(command[4:]))
    with open(log_path, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if verbose or line.startswith(("done", "error")):
                print(line, end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"tbpw run failed (exit {proc.returncode}): see {log_path}")


def stage_seconds(run: Path, stage: str) -> float | None:
    manifest = run / stage / "manifest.json"
    return json.loads(manifest.read_text())["seconds"] if manifest.is_file() else None


def fork_files(args: argparse.Namespace, result: Result, model: Path, imatrix: Path, work: Path) -> list[dict]:
    """The fork's file at each level's bpw (compare_files entries); their times go into `result`'s fork rows."""
    from tbpw.llamacpp.build import BuildInfo
    from tbpw.llamacpp.features import detect
    from tbpw.llamacpp.quantize import quantize

    build = BuildInfo.load(Path(args.fork_build))
    found = detect(build)
    if not found.target_bpw:
        raise SystemExit(f"error: the build in {args.fork_build} has no --target-bpw: it is not the fork")
    result.notes.append(f"fork rows: `llama-quantize --target-bpw <level's bpw>` of the fork's build (source "
                        f"{Path(build.source_name).name}, commit {found.commit}), with the run's imatrix and one --state-file across levels (its time: "
                        "the first level measures, the others reuse); evaluated by the same run as `compare_files`")
    folder = work / "fork"
    folder.mkdir(exist_ok=True)
    state = folder / "fork.bpw_state"
    state.unlink(missing_ok=True)
    files = []
    for level, bpw in result.targets.items():
        out = folder / f"fork-{level}.gguf"
        start = time.monotonic()
        quantize(model, out, imatrix=imatrix, base_type="Q8_0", threads=args.threads, build=build,
                 extra=["--target-bpw", repr(bpw), "--state-file", state], log_path=folder / f"{level}.log")
        result.steps[f"fork {level}"] = time.monotonic() - start
        files.append({"path": str(out), "label": f"fork-{level}"})
    return files


def run_benchmark(args: argparse.Namespace) -> Result:
    from tbpw.llamacpp.quantize import quantize

    model, label, notes = resolve_model(args.model)
    label = args.label or label
    ctx = args.ctx or (256 if args.model in BENCH_MODELS else 512)
    work = Path(args.work) / label
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(recipe_text(label, model, args.levels, ctx, args.chunks, args.imatrix_chunks, args.threads))
    sets = [f"output_dir={run}", *args.set]
    # The printed recipe names the model as a reader finds it, not by this machine's path.
    printed = recipe_path.read_text().replace(str(model), public_model(args.model, model))
    written = printed + "".join(f"# --set {s}\n" for s in args.set)
    result = Result(label, written, notes=list(notes))
    for note in notes:
        log(note)

    tbpw_run(recipe_path, sets, work / "run.log", args.verbose)
    report = json.loads((run / "report" / "report.json").read_text())
    stock = {e["name"].removeprefix("stock-"): e for e in report["entries"] if e["kind"] == "stock"}
    result.targets = {level: stock[level]["bpw"] for level in args.levels}
    if args.fork_build:
        files = fork_files(args, result, model, run / "imatrix" / "imatrix.gguf", work)
        tbpw_run(recipe_path, [*sets, f"compare_files={json.dumps(files)}"], work / "run.log", args.verbose)
        report = json.loads((run / "report" / "report.json").read_text())

    # The time unit: one plain stock Q4_K_M quantization, best of two (the first also pays for a cold disk cache).
    reference = work / "reference-Q4_K_M.gguf"
    result.stock_seconds = min(quantize(model, reference, imatrix=run / "imatrix" / "imatrix.gguf", base_type="Q4_K_M",
                                        threads=args.threads, log_path=work / "reference.quantize.log").seconds
                               for _ in range(2))
    reference.unlink()
    result.notes.append(f"float model PPL {report['baseline_ppl']:.3f} on {args.chunks} x {ctx} held-out tokens")
    for stage in ONE_OFF:
        if (seconds := stage_seconds(run, stage)) is not None:
            result.steps[stage] = seconds
    for level in args.levels:
        target = f"like-{level}"
        for e in report["entries"]:
            if e["kind"] == "stock" and e["name"] == f"stock-{level}":
                row = Row(level, "stock", e["bpw"], e["metrics"], stage_seconds(run, e["name"]))
            elif e["kind"] == "tbpw" and e["target"] == target:
                row = Row(level, e["name"], e["bpw"], e["metrics"], stage_seconds(run, e["name"]), e.get("note", ""))
                if e["allocator"] == "choose":
                    result.choices[level] = json.loads((run / e["name"] / "manifest.json").read_text())["result"]
            elif e["kind"] == "other" and e["name"] == f"other-fork-{level}":
                row = Row(level, "fork --target-bpw", e["bpw"], e["metrics"], result.steps.pop(f"fork {level}", None))
            else:
                continue
            result.rows.append(row)
            log(f"{level}: {row.variant} {row.bpw:.4f} bpw KLD {row.metrics.get('kld_mean', float('nan')):.6f}")
    return result


# ---------------------------------------------------------------- the table


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def chosen_rows(result: Result) -> list[Row]:
    """tbpw's answer at each level: the run's chosen quant (else its only tbpw quant)."""
    rows = [r for r in result.rows if r.variant.endswith("-choose")]
    return rows or [r for r in result.rows if r.variant.startswith("quant-")]


def kld(row: Row) -> float:
    return row.metrics.get("kld_mean", float("nan"))


def family(row: Row) -> str:
    """The variant with its level taken out (`quant-like-Q2_K-choose` -> `quant-<level>-choose`)."""
    return re.sub(r"^quant-like-[^-]+-", "quant-<level>-", row.variant)


def target_summary(result: Result) -> list[str]:
    """The chosen plan against the quality targets: per level KLD / min(stock, fork) (or / stock without fork
    rows), the geometric mean, and whether both targets are met."""
    stock = {r.level: kld(r) for r in result.rows if r.variant == "stock"}
    fork = {r.level: kld(r) for r in result.rows if r.variant.startswith("fork")}
    rows = [r for r in chosen_rows(result) if r.level in stock]
    if not rows:
        return []
    with_fork = bool(fork) and all(r.level in fork for r in rows)
    level_max, mean_max = TARGETS_WITH_FORK if with_fork else TARGETS_STOCK_ONLY
    ratios = {r.level: kld(r) / (min(stock[r.level], fork[r.level]) if with_fork else stock[r.level]) for r in rows}
    against = "min(stock, fork)" if with_fork else "stock"
    worst = max(ratios, key=lambda k: ratios[k])
    gm = geomean(list(ratios.values()))
    missed = [k for k, v in ratios.items() if v > level_max]
    return [f"Targets of the chosen plan: KLD / {against} <= {level_max} at every level and a geometric mean <= "
            f"{mean_max}.", "",
            "| level | " + " | ".join(ratios) + " | geometric mean |",
            "|---|" + "---|" * (len(ratios) + 1),
            f"| KLD / {against} | " + " | ".join(f"{v:.3f}" for v in ratios.values()) + f" | {gm:.3f} |",
            "| shortfall (bpw) | " + " | ".join(f"{result.targets[r.level] - r.bpw:.4f}" for r in rows) + " | |", "",
            f"- every level: {'met' if not missed else 'missed at ' + ', '.join(missed)} (worst {ratios[worst]:.3f} at "
            f"{worst})",
            f"- geometric mean: {gm:.3f}, {'met' if gm <= mean_max else 'missed'}", ""]


def markdown(result: Result, args: argparse.Namespace) -> str:
    from tbpw.llamacpp.build import active_build

    build = active_build()
    stock = {r.level: r for r in result.rows if r.variant == "stock"}
    fork = {r.level: r for r in result.rows if r.variant.startswith("fork")}
    unit = result.stock_seconds or float("nan")
    lines = [f"### {result.model}", "", f"Made {time.strftime('%Y-%m-%d')} by `.venv/bin/python -m benchmarks.quality "
             + " ".join(public_argv(args.argv)) + "`: every tbpw row is a quant of one `tbpw run` of this recipe (llama.cpp build "
             f"{build.build_number}, {build.backend}):", "", "```yaml", result.recipe.rstrip(), "```", ""]
    lines += [f"- {n}" for n in result.notes]
    lines += ["- variant: `stock` is the run's stock file of that type, `fork --target-bpw` the fork's file at its size "
              "(a `compare_files` entry of the run), `quant-like-<level>-choose` the run's chosen plan at that size "
              "(and `quant-like-<level>-<allocator>` each allocator's plan on the measured table, when the recipe "
              "writes them); KLD and the rest are the run's `kld` evaluator on the held-out text",
              "- short: the level's target (the stock file's bpw) minus the variant's bpw",
              f"- time: multiples of one plain stock Q4_K_M quantization ({unit:.2f} s, best of 2, wall clock on a 2-core "
              "machine), from each stage's manifest; the choice's time includes writing and scoring its candidates", ""]
    header = "| level | variant | bpw | short | KLD mean | KLD p99 | same top p | ρ PPL | PPL | KLD / stock | time |"
    if fork:
        header += " KLD / fork |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in result.rows:
        m = r.metrics
        ratio = kld(r) / kld(stock[r.level]) if r.level in stock else float("nan")
        cells = [r.level, r.variant + (f" → {r.note}" if r.note else ""), f"{r.bpw:.4f}",
                 f"{result.targets[r.level] - r.bpw:.4f}", f"{kld(r):.6f}", f"{m.get('kld_p99', float('nan')):.6f}",
                 f"{m.get('same_top_p', float('nan')):.2f}%", f"{m.get('rho_ppl', float('nan')):.2f}%",
                 f"{m.get('ppl', float('nan')):.3f}", "–" if r.variant == "stock" else f"{ratio:.3f}",
                 "–" if r.seconds is None else f"{r.seconds / unit:.1f}x"]
        if fork:
            cells.append(f"{kld(r) / kld(fork[r.level]):.3f}" if r.level in fork and r not in fork.values() else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Geometric mean of KLD(variant) / KLD(stock) over the levels:", ""]
    families = dict.fromkeys(family(r) for r in result.rows if r.variant != "stock")
    for name in families:
        members = [r for r in result.rows if family(r) == name]
        ratios = [kld(r) / kld(stock[r.level]) for r in members if r.level in stock]
        line = f"- {name}: {geomean(ratios):.3f} (worst level {max(ratios):.3f}, {len(ratios)} levels)"
        if fork and not name.startswith("fork"):
            against = [kld(r) / kld(fork[r.level]) for r in members if r.level in fork]
            line += f"; against the fork {geomean(against):.3f} (worst {max(against):.3f})" if against else ""
        lines.append(line)
    lines += ["", *target_summary(result)]
    one_off = ", ".join(f"{k} {v / unit:.1f}x" for k, v in result.steps.items())
    lines += [f"One-off stages: {one_off}.", ""]
    return "\n".join(lines)


def write_section(path: Path, model: str, text: str) -> None:
    from tbpw.files.atomic import write_text

    begin, end = f"<!-- quality:{model} -->", f"<!-- /quality:{model} -->"
    doc = path.read_text(encoding="utf-8") if path.is_file() else "# Results: quality at equal size\n\n"
    block = f"{begin}\n{text}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: block, doc)
    elif ANCHOR in doc:  # a new section goes where the page keeps the sections tbpw run made
        doc = doc.replace(ANCHOR, f"{block}\n\n{ANCHOR}", 1)
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, doc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench", help="bench or bench-odd (tbpw's trained models), or a GGUF path")
    p.add_argument("--label", help="the section's name in --out (default: the model's name)")
    p.add_argument("--levels", default=",".join(DEFAULT_LEVELS), help="the stock types whose sizes are the targets")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="a recipe override (repeatable): a variant of the recipe, as `tbpw run --set` takes it")
    p.add_argument("--fork-build", help="a build folder of the target-bpw fork (holding build.json and bin/) for the "
                                        "fork's rows")
    p.add_argument("--chunks", type=int, default=100, help="evaluation chunks (held-out text)")
    p.add_argument("--imatrix-chunks", type=int, default=100)
    p.add_argument("--ctx", type=int, default=0, help="context (default 256 for the bench models, 512 otherwise)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/tbpw-quality", help="where the recipe, the run and the fork's files go")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "quality.md"))
    p.add_argument("--json", help="also write the rows and each level's choice as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="show every line tbpw run prints")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.levels = [x.strip() for x in args.levels.split(",") if x.strip()]

    result = run_benchmark(args)
    text = markdown(result, args)
    print(text)
    write_section(Path(args.out), result.model, text)
    if args.json:
        from tbpw.files.atomic import write_json

        write_json(args.json, {"model": result.model, "recipe": result.recipe, "targets": result.targets,
                               "stock_seconds": result.stock_seconds, "steps": result.steps, "notes": result.notes,
                               "rows": [r.__dict__ for r in result.rows], "choices": result.choices})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
