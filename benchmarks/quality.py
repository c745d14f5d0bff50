#!/usr/bin/env python3
"""Quality at equal size: tbpw against stock llama.cpp (and the fork, when active) by KL divergence.

    .venv/bin/python benchmarks/quality.py [--model bench|bench-odd|smollm2|PATH] [--levels IQ3_XXS,Q2_K,...]
        [--allocators knapsack,lagrangian] [--metrics wmse] [--candidates fork,Q2_0,...] [--no-calibrated]
        [--no-select] [--fork-build BUILD_DIR] [--chunks 100] [--out docs/quality.md]

For each stock type (level): quantize with stock llama-quantize and an imatrix made on the CALIBRATION side of
tbpw's Wikipedia split, read the file's exact bpw, make tbpw quants at that bpw with every allocator x error
table (each metric's proxy table and, unless --no-calibrated, its KLD-calibrated table), and pick one of them
by KL divergence on calibration text (`tbpw-select`, unless --no-select). Every quant is then scored with
llama-perplexity --kl-divergence against the float model's logits on the held-out EVALUATION side, which
nothing but that final scoring ever reads. Times are given as multiples of one plain stock Q4_K_M quantization.

The fork's rows come from `--fork-build`, a folder of a build of the target-bpw fork (`tbpw build --source
PATH` with TBPW_HOME elsewhere, so that the stock build stays active), or from the active build when that is
the fork. The fork gets the same imatrix, made by tbpw's collector: the E[a²] stock llama-imatrix writes,
plus the E[a] the fork's metric uses.

It runs tbpw's own path as `tbpw run` does: quants assembled from the tensor store (`--no-store`: llama-quantize
writes each), the measurement's default sampling, one set of float logits on the calibration text shared by the
calibration and every level's choice (a plan two levels share is scored once), and the choice's screening
(`--screen-chunks`, `--finalists`, `--margin`; defaults: the recipe's). `--json` keeps every candidate's calibration scores,
per chunk, for studying the choice's rules.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tbpw.allocate.budget import Target  # noqa: E402
from tbpw.allocate.constraints import Constraints  # noqa: E402
from tbpw.allocate.service import Planner  # noqa: E402
from tbpw.data import assets  # noqa: E402
from tbpw.llamacpp.build import BuildInfo  # noqa: E402
from tbpw.llamacpp.imatrix import make_imatrix  # noqa: E402
from tbpw.llamacpp.perplexity import KldScore, base_logits, kld  # noqa: E402
from tbpw.llamacpp.quantize import quantize  # noqa: E402
from tbpw.measure.engine import measure  # noqa: E402
from tbpw.measure.table import ErrorTable  # noqa: E402
from tbpw.model.inventory import ModelInventory  # noqa: E402
from tbpw.quantize.store import TensorStore  # noqa: E402
from tbpw.run.recipe import CalibrateOptions, ChooseOptions  # noqa: E402
from tbpw.select.calibrate import Sensitivity, calibrate, calibrated_table  # noqa: E402
from tbpw.select.choose import PlanCandidate, candidate_name, select_plan  # noqa: E402
from tbpw.select.interactions import with_role_interactions  # noqa: E402
from tbpw.select.refine import refine_plan  # noqa: E402
from tbpw.select.scoring import Scorer  # noqa: E402

DEFAULT_LEVELS = ("IQ3_XXS", "Q2_K", "Q3_K_M", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K")
DEQUANTIZED_MAX_BPW = 4.5
BENCH_MODELS = ("bench", "bench-odd")
# The quality targets of the chosen plan: KLD / min(stock, fork) per level and their geometric mean; without
# fork rows, KLD / stock.
TARGETS_WITH_FORK = (0.85, 0.70)
TARGETS_STOCK_ONLY = (0.60, 0.45)


@dataclass
class Row:
    level: str
    variant: str
    bpw: float
    score: KldScore
    seconds: float
    note: str = ""


@dataclass
class Run:
    model: str
    rows: list[Row] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)  # one-off steps -> seconds
    stock_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    selected: dict[str, str] = field(default_factory=dict)  # level -> chosen variant
    targets: dict[str, float] = field(default_factory=dict)  # level -> the target bpw (the stock file's)
    reused: list[str] = field(default_factory=list)  # one-off steps taken from an earlier run (--reuse)
    selections: dict[str, dict] = field(default_factory=dict)  # level -> select_plan's record


def log(line: str) -> None:
    print(line, flush=True)


def resolve_model(spec: str, device: str = "cpu") -> tuple[Path, str, list[str]]:
    """(F16 GGUF, display name, notes printed next to the numbers)."""
    if spec in BENCH_MODELS:
        from scripts.training.bench_model import MODELS, bench_model, settings_for

        bm = bench_model(settings=settings_for(device, MODELS[spec]), log=log)
        m = bm.manifest
        st = m["settings"]
        where = "2 CPU threads" if device == "cpu" else "a GPU"
        return bm.gguf, spec if device == "cpu" else f"{spec}-{device}", [
            f"benchmark model: tbpw's trained llama ({m['parameters'] / 1e6:.2f} M parameters, genuine float weights; "
            f"hidden {st['hidden']}, {st['layers']} layers, {st['heads']} heads / {st['kv_heads']} KV heads, ffn {st['ffn']}; "
            f"held-out PPL {m['heldout_ppl']}, {m['tokens_seen'] / 1e6:.2f} M tokens seen in "
            f"{m['train_seconds'] / 60:.1f} min on {where}; settings key {m['key']})"]
    if spec == "smollm2":
        return assets.demo_model().f16, "smollm2", [
            f"CAVEAT: {assets.DEQUANTIZED_NOTE}; only levels whose stock file lies below the source's precision are run "
            "(see the threshold below), and even there an allocator that finds Q4_1 is favoured."]
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"error: no model {spec!r}: use {', '.join(BENCH_MODELS)}, smollm2 or the path of an F16/BF16 GGUF")
    return path, path.stem, []


def score(model: Path, base, work: Path, name: str, threads: int) -> KldScore:
    return kld(model, base, threads=threads, log_path=work / f"{name}.eval-kld.log")


def fork_build(args: argparse.Namespace, run: Run) -> BuildInfo | None:
    """The build whose --target-bpw makes the fork's rows (None: no fork rows, and a note saying why)."""
    from tbpw.llamacpp.build import active_build
    from tbpw.llamacpp.features import detect

    if not args.fork:
        return None
    if args.fork_build:
        build = BuildInfo.load(Path(args.fork_build))
        if not detect(build).target_bpw:
            raise SystemExit(f"error: the build in {args.fork_build} has no --target-bpw: it is not the fork")
    else:
        build = active_build()
        if not detect(build).target_bpw:
            run.notes.append("the active llama.cpp build has no --target-bpw (it is not the fork) and no --fork-build "
                             "was given: no fork rows")
            return None
    f = detect(build)
    run.notes.append(f"fork rows: `llama-quantize --target-bpw <level's bpw>` of the fork build {build.source_name} "
                     f"(commit {f.commit}), with the same imatrix and its --state-file shared across levels (its "
                     "time: the first level measures, the others reuse)")
    return build


def check_shared_errors(narrow: ErrorTable, wide: ErrorTable) -> None:
    """The wider table must agree with the narrower one on every type both measured (same rows, same metric)."""
    wide_by = wide.by_name()
    for t in narrow.tensors:
        theirs = {c.type: c for c in wide_by[t.name].candidates}
        for c in t.candidates:
            other = theirs.get(c.type)
            if other is None or other.bytes != c.bytes or not math.isclose(other.error, c.error, rel_tol=1e-9):
                raise SystemExit(f"error: the wider candidate table disagrees on {t.name} {c.type}: measure again")


def run_benchmark(args: argparse.Namespace) -> Run:
    model, label, notes = resolve_model(args.model, args.bench_device)
    label = args.label or label
    run = Run(label, notes=list(notes))
    if args.model == "smollm2":
        run.notes.append(f"levels kept: stock file below {args.dequantized_max_bpw} bpw")
    for note in notes:
        log(note)
    dequantized = args.model == "smollm2"
    ctx = args.ctx or (256 if args.model in BENCH_MODELS else 512)
    work = Path(args.work) / label
    if work.exists() and not args.reuse:
        shutil.rmtree(work)  # every one-off step is timed cold
    work.mkdir(parents=True, exist_ok=True)
    wiki = assets.wiki_split()
    calibration, evaluation = wiki.calibration, wiki.evaluation
    threads = args.threads
    fork = fork_build(args, run)

    t = time.monotonic()
    imatrix = work / f"imatrix-{args.collector}.gguf"
    if imatrix.is_file():
        run.reused.append("imatrix")
    else:
        make_imatrix(model, calibration, imatrix, collector=args.collector, chunks=args.imatrix_chunks, ctx=ctx,
                     threads=threads, log_path=work / "imatrix.log")
    run.steps["imatrix"] = time.monotonic() - t

    # The time unit: one plain stock Q4_K_M quantization, best of two (the first also pays for a cold disk cache).
    reference = work / "reference-Q4_K_M.gguf"
    run.stock_seconds = min(quantize(model, reference, imatrix=imatrix, base_type="Q4_K_M", threads=threads,
                                     log_path=work / "reference.quantize.log").seconds for _ in range(2))
    reference.unlink()

    # The ONLY use of the evaluation text: the float model's logits that every quant is scored against.
    t = time.monotonic()
    if (work / "eval-base.logits").is_file():
        run.reused.append("float logits (evaluation)")
    eval_base = base_logits(model, evaluation, work / "eval-base.logits", ctx=ctx, chunks=args.chunks,
                            threads=threads, log_path=work / "eval-base.log")
    run.steps["float logits (evaluation)"] = time.monotonic() - t
    log(f"float model: PPL {eval_base.ppl:.3f} on {args.chunks} x {ctx} tokens of held-out text")
    run.notes.append(f"float model PPL {eval_base.ppl:.3f} on {args.chunks} x {ctx} held-out tokens")

    store = TensorStore(work / "store", threads=threads) if args.store else None
    source = store.source(model, imatrix) if store is not None else None
    scorer = Scorer(model, calibration, imatrix=imatrix, ctx=ctx, chunks=args.cal_chunks, threads=threads,
                    cache_dir=work / "scores", log=log if args.verbose else None)
    tables: dict[str, ErrorTable] = {}
    for metric in args.metrics:
        t = time.monotonic()
        tables[metric] = measure(model, imatrix, metric=metric, threads=threads, progress=False, candidates=args.candidates,
                                 sampling={"scale": args.sampling_scale} if args.sampling_scale != 1.0 else None,
                                 cache_dir=work / "measure-cache", store=source)
        run.steps[f"measure {metric}"] = time.monotonic() - t
        if tables[metric].meta.get("cached"):
            run.reused.append(f"measure {metric}")
        families = {metric: tables[metric]}  # a measured table -> its name
        if args.extra_candidates:
            t = time.monotonic()
            wide = [*(args.candidates or ["fork"]), *args.extra_candidates]
            tables[f"{metric}+x"] = measure(model, imatrix, metric=metric, threads=threads, progress=False,
                                            candidates=wide, cache_dir=work / "measure-cache", store=source,
                                            sampling={"scale": args.sampling_scale} if args.sampling_scale != 1.0 else None)
            run.steps[f"measure {metric}+x"] = time.monotonic() - t
            check_shared_errors(tables[metric], tables[f"{metric}+x"])
            families[f"{metric}+x"] = tables[f"{metric}+x"]
        if args.calibrated:
            def sensitivity(step: str, table: ErrorTable, probes: list[str], grouping: str) -> Sensitivity:
                t = time.monotonic()
                found = calibrate(model, imatrix, calibration, table, probe_types=probes, grouping=grouping,
                                  ctx=ctx, chunks=args.calibrate_chunks or args.cal_chunks,
                                  background=args.background, threads=threads, cache_dir=work / "sensitivity-cache",
                                  scorer=scorer, store=store,
                                  log=log if args.verbose else None)
                run.steps[step] = time.monotonic() - t
                if found.meta.get("cached"):
                    run.reused.append(step)
                return found

            sens = sensitivity(f"calibrate {metric}", tables[metric], args.probes, args.grouping)
            # The measured KLD does not depend on the candidate list: the wider table takes the same sensitivity.
            sensitivities = {"kld": sens}
            if args.second_probes:
                sensitivities["kld2p"] = sensitivity(f"calibrate {metric} (probes {'+'.join(args.second_probes)})",
                                                     tables[metric], args.second_probes, args.grouping)
            if args.interactions and args.grouping == "tensor":
                roles = sensitivity(f"calibrate {metric} per role", tables[metric], args.probes, "role")
                sensitivities["kldi"] = with_role_interactions(sens, roles)
                log("role interaction factors: " + ", ".join(
                    f"{r} {'/'.join(f'{v:.2f}' for v in f.values())}"
                    for r, f in sensitivities["kldi"].meta["role_factors"].items()))
            for family, measured in families.items():
                for kind, sensitivity in sensitivities.items():
                    for strength in args.strengths:
                        suffix = "" if strength == 1.0 else f"{strength:g}"
                        tables[f"{family}+{kind}{suffix}"] = calibrated_table(measured, sensitivity, strength)

    planner = Planner(model, imatrix, threads=threads, constraints=Constraints.parse(args.constraints), store=store)
    for level in args.levels:
        lw = work / level
        lw.mkdir(exist_ok=True)
        stock_out = lw / "stock.gguf"
        t = time.monotonic()
        qrun = quantize(model, stock_out, imatrix=imatrix, base_type=level, threads=threads, log_path=lw / "stock.quantize.log")
        seconds = qrun.seconds
        bpw = ModelInventory.load(stock_out).bpw()
        if dequantized and bpw >= args.dequantized_max_bpw:
            log(f"{level}: {bpw:.4f} bpw is not below {args.dequantized_max_bpw} on a dequantized model: skipped")
            stock_out.unlink()
            continue
        s = score(stock_out, eval_base, lw, "stock", threads)
        run.rows.append(Row(level, "stock", bpw, s, seconds))
        run.targets[level] = bpw
        log(f"{level}: stock {bpw:.4f} bpw KLD {s.kld_mean:.6f}")
        stock_out.unlink()

        target = Target.parse(bpw=bpw)
        candidates: list[PlanCandidate] = []
        made: dict[str, tuple[float, KldScore, float]] = {}
        problems = {}
        written: dict[str, Path] = {}
        labels: dict[str, str] = {}  # candidate name -> the table's "allocator/table"
        for table_name, table in tables.items():
            for allocator in args.allocators:
                name, key = f"{allocator}/{table_name}", candidate_name(allocator, table_name)
                t = time.monotonic()
                problem = planner.problem(table, target)
                plan = planner.plan(table, target, allocator, problem=problem)
                out = lw / f"{key}.gguf"
                applied = planner.write(plan, out, log_path=lw / f"{out.stem}.quantize.log")
                seconds = time.monotonic() - t
                s = score(out, eval_base, lw, out.stem, threads)
                run.rows.append(Row(level, name, applied.achieved_bpw, s, seconds))
                made[name] = (applied.achieved_bpw, s, seconds)
                candidates.append(PlanCandidate(key, plan))
                problems[key], written[key], labels[key] = problem, out, name
                log(f"{level}: {name} {applied.achieved_bpw:.4f} bpw KLD {s.kld_mean:.6f}")
        if args.select_tables == "calibrated" and args.calibrated:
            picked = [c for c in candidates if "+kld" in labels[c.name]]
        else:
            picked = candidates
        if args.select and len(picked) > 1:
            t = time.monotonic()
            sel = select_plan(picked, planner, calibration, work / "select", ctx=ctx, chunks=args.cal_chunks,
                              screen_chunks=args.screen_chunks, finalists=args.finalists, margin=args.margin,
                              written=written,
                              scorer=scorer, log=log if args.verbose else None)
            # every candidate's full calibration score, for studying the choice's rules (kept scores cost nothing)
            full = {name: scorer.score(written[name], c.plan.types(), args.cal_chunks).to_json()
                    for c in candidates for name in [c.name]} if args.json else {}
            run.selections[level] = {"best": labels[sel.best], "labels": labels, **sel.to_json(), "all_scores": full,
                                     "kld_runs": sel.runs}
            seconds = time.monotonic() - t
            chosen = labels[sel.best]
            bpw_c, s_c, sec_c = made[chosen]
            run.selected[level] = chosen
            # its cost: making every candidate plus scoring them all on calibration text
            total = sum(sec for _, _, sec in made.values()) + seconds
            run.rows.append(Row(level, "tbpw-select", bpw_c, s_c, total, note=chosen))
            log(f"{level}: tbpw-select chose {chosen} (calibration KLD {sel.scores[sel.best].kld_mean:.6f})")
            if args.refine_rounds > 0:
                t = time.monotonic()
                ref = refine_plan(planner, problems[sel.best], sel.plan, calibration, work / "select",
                                  rounds=args.refine_rounds, tries=args.refine_tries, ctx=ctx, chunks=args.cal_chunks,
                                  start_score=sel.scores[sel.best] if sel.chunks == args.cal_chunks else None, scorer=scorer, log=log if args.verbose else None)
                out = lw / "refined.gguf"
                applied = planner.write(ref.plan, out, log_path=lw / "refined.quantize.log")
                seconds = total + time.monotonic() - t
                s = score(out, eval_base, lw, "refined", threads)
                out.unlink()
                note = f"{chosen}, {len(ref.accepted)} swaps kept of {ref.evaluated} tried"
                run.rows.append(Row(level, "tbpw-refine", applied.achieved_bpw, s, seconds, note=note))
                log(f"{level}: tbpw-refine {note}: calibration KLD {ref.start.kld_mean:.6f} -> {ref.score.kld_mean:.6f}, "
                    f"evaluation KLD {s.kld_mean:.6f}")
        for path in written.values():
            path.unlink(missing_ok=True)
        if fork is not None:
            out = lw / "fork.gguf"
            t = time.monotonic()
            quantize(model, out, imatrix=imatrix, base_type="Q8_0", threads=threads, build=fork,
                     extra=["--target-bpw", repr(bpw), "--state-file", str(work / "fork.bpw_state")],
                     log_path=lw / "fork.quantize.log")
            seconds = time.monotonic() - t
            s = score(out, eval_base, lw, "fork", threads)
            run.rows.append(Row(level, "fork --target-bpw", ModelInventory.load(out).bpw(), s, seconds))
            out.unlink()
    return run


# ---------------------------------------------------------------- the table


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def chosen_variant(run: Run) -> str | None:
    """The variant that is tbpw's answer: the refined choice when refinement ran, else the selection."""
    names = {r.variant for r in run.rows}
    return next((v for v in ("tbpw-refine", "tbpw-select") if v in names), None)


def target_summary(run: Run) -> list[str]:
    """The chosen plan against the quality targets: per level KLD / min(stock, fork) (or / stock without fork
    rows), the geometric mean, and whether both targets are met."""
    chosen = chosen_variant(run)
    if chosen is None:
        return []
    stock = {r.level: r.score.kld_mean for r in run.rows if r.variant == "stock"}
    fork = {r.level: r.score.kld_mean for r in run.rows if r.variant.startswith("fork")}
    rows = [r for r in run.rows if r.variant == chosen and r.level in stock]
    with_fork = bool(fork) and all(r.level in fork for r in rows)
    level_max, mean_max = TARGETS_WITH_FORK if with_fork else TARGETS_STOCK_ONLY
    ratios = {r.level: r.score.kld_mean / (min(stock[r.level], fork[r.level]) if with_fork else stock[r.level])
              for r in rows}
    if not ratios:
        return []
    against = "min(stock, fork)" if with_fork else "stock"
    worst = max(ratios, key=lambda k: ratios[k])
    gm = geomean(list(ratios.values()))
    missed = [k for k, v in ratios.items() if v > level_max]
    lines = [f"Targets of the chosen plan ({chosen}): KLD / {against} <= {level_max} at every level and a geometric "
             f"mean <= {mean_max}.", "",
             "| level | " + " | ".join(ratios) + " | geometric mean |",
             "|---|" + "---|" * (len(ratios) + 1),
             f"| KLD / {against} | " + " | ".join(f"{v:.3f}" for v in ratios.values()) + f" | {gm:.3f} |",
             "| shortfall (bpw) | " + " | ".join(f"{run.targets[r.level] - r.bpw:.4f}" for r in rows) + " | |", "",
             f"- every level: {'met' if not missed else 'missed at ' + ', '.join(missed)} (worst {ratios[worst]:.3f} at {worst})",
             f"- geometric mean: {gm:.3f}, {'met' if gm <= mean_max else 'missed'}", ""]
    return lines


def markdown(run: Run, args: argparse.Namespace) -> str:
    from tbpw.llamacpp.build import active_build

    build = active_build()
    stock = {r.level: r for r in run.rows if r.variant == "stock"}
    fork = {r.level: r for r in run.rows if r.variant.startswith("fork")}
    ref = run.stock_seconds or float("nan")
    sampling = f" at scale {args.sampling_scale}" if args.sampling_scale != 1.0 else ""
    writer = "assembled from the tensor store" if args.store else "written by llama-quantize"
    screening = (f"screens every plan on {args.screen_chunks} calibration chunks first (at most {args.finalists} "
                 f"finalists go on, margin {args.margin:g})" if args.screen_chunks
                 else "scores every plan on every calibration chunk")
    path_note = (f"- error tables measured with the default row sampling{sampling}; quants {writer}; calibration "
                 f"probes keep the other tensors {args.background}; tbpw-select {screening}")
    lines = [f"### {run.model}", ""]
    lines += [f"- {n}" for n in run.notes]
    cands = ", ".join(args.candidates) if args.candidates else "the fork's 20"
    lines += [f"- llama.cpp build {build.build_number} ({build.backend}); imatrix: "
              + ("tbpw's collector (stock llama-imatrix's E[a²], plus E[a])" if args.collector == "tbpw"
                 else "stock llama-imatrix")
              + f" on {args.imatrix_chunks} chunks of the calibration side; KLD against the float logits on "
              f"{args.chunks} chunks of the held-out evaluation side",
              f"- tbpw variants: allocator/table for allocators {', '.join(args.allocators)} and tables "
              f"{', '.join(args.metrics)}" + (f" (+kld: calibrated on {args.calibrate_chunks or args.cal_chunks} calibration chunks, probes "
                                              f"{', '.join(args.probes)}, per {args.grouping}"
                                              + ("; +kldi: the same, each role's scales corrected by the KLD of the "
                                                 "whole role at once over the sum of its tensors alone"
                                                 if args.interactions else "")
                                              + (f"; +kld2p: the same with probes {', '.join(args.second_probes)}"
                                                 if args.second_probes else "") + ")" if args.calibrated else "")
              + ("; tbpw-select: the " + ("calibrated " if args.select_tables == "calibrated" and args.calibrated else "")
                 + "variant with the lowest KLD on calibration chunks (never the evaluation text)" if args.select else "")
              + (f"; tbpw-refine: tbpw-select's plan improved by up to {args.refine_rounds} rounds of "
                 f"{args.refine_tries} type swaps, each kept only when calibration KLD confirms it"
                 if args.select and args.refine_rounds > 0 else ""),
              f"- candidate types: {cands}"
              + (f"; tables named <metric>+x add {', '.join(args.extra_candidates)} (same calibration)"
                 if args.extra_candidates else "") + (f"; constraints {json.dumps(args.constraints)}" if args.constraints else ""),
              path_note,
              "- short: the level's target (the stock file's bpw) minus the variant's bpw",
              f"- time: multiples of one plain stock Q4_K_M quantization ({ref:.2f} s, best of 2, wall clock on a 2-core machine"
              + (", loaded by other jobs: times are inflated and noisy, KLD figures are deterministic" if args.loaded else "")
              + "); a variant's time is allocation + writing; tbpw-select's is all candidates + scoring them on calibration "
              "text; one-off steps (imatrix, measurement, calibration) are listed below the table", ""]
    header = "| level | variant | bpw | short | KLD mean | KLD p99 | same top p | ρ PPL | PPL | KLD / stock | time |"
    if fork:
        header += " KLD / fork |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in run.rows:
        ratio = r.score.kld_mean / stock[r.level].score.kld_mean if r.level in stock else float("nan")
        variant = r.variant + (f" → {r.note}" if r.note else "")
        short = run.targets[r.level] - r.bpw if r.level in run.targets else float("nan")
        cells = [r.level, variant, f"{r.bpw:.4f}", f"{short:.4f}", f"{r.score.kld_mean:.6f}", f"{r.score.kld_p99:.6f}",
                 f"{r.score.same_top_p:.2f}%", f"{r.score.rho_ppl:.2f}%", f"{r.score.ppl:.3f}",
                 "–" if r.variant == "stock" else f"{ratio:.3f}", f"{r.seconds / ref:.1f}x"]
        if fork:
            cells.append(f"{r.score.kld_mean / fork[r.level].score.kld_mean:.3f}"
                         if r.level in fork and not r.variant.startswith("fork") else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Geometric mean of KLD(variant) / KLD(stock) over the levels:", ""]
    variants = [v for v in dict.fromkeys(r.variant for r in run.rows) if v != "stock"]
    for v in variants:
        ratios = [r.score.kld_mean / stock[r.level].score.kld_mean for r in run.rows if r.variant == v and r.level in stock]
        worst = max(ratios) if ratios else float("nan")
        line = f"- {v}: {geomean(ratios):.3f} (worst level {worst:.3f}, {len(ratios)} levels)"
        if fork and not v.startswith("fork"):
            fr = [r.score.kld_mean / fork[r.level].score.kld_mean for r in run.rows if r.variant == v and r.level in fork]
            line += f"; against the fork {geomean(fr):.3f} (worst {max(fr):.3f})" if fr else ""
        lines.append(line)
    lines += [""] + target_summary(run)
    one_off = ", ".join(f"{k} {'reused' if k in run.reused else f'{v / ref:.1f}x'}" for k, v in run.steps.items())
    lines += [f"One-off steps: {one_off}.", ""]
    return "\n".join(lines)


def write_section(path: Path, model: str, text: str) -> None:
    from tbpw.files.atomic import write_text

    begin, end = f"<!-- quality:{model} -->", f"<!-- /quality:{model} -->"
    doc = path.read_text(encoding="utf-8") if path.is_file() else "# Quality at equal size\n\n"
    block = f"{begin}\n{text}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench",
                   help="bench or bench-odd (tbpw's trained models), smollm2, or a GGUF path")
    p.add_argument("--label", help="the section's name in --out (default: the model's name)")
    p.add_argument("--bench-device", choices=["cpu", "cuda"], default="cpu",
                   help="where the benchmark model is trained (cpu: the reference in docs/quality.md)")
    p.add_argument("--levels", default=",".join(DEFAULT_LEVELS))
    p.add_argument("--allocators", default="knapsack,lagrangian")
    p.add_argument("--metrics", default="wmse")
    p.add_argument("--no-calibrated", dest="calibrated", action="store_false", help="skip the KLD-calibrated tables")
    p.add_argument("--no-select", dest="select", action="store_false", help="skip the choice by calibration KLD")
    p.add_argument("--no-fork", dest="fork", action="store_false", help="skip the fork's --target-bpw row")
    p.add_argument("--fork-build", help="a build folder of the target-bpw fork (holding build.json and bin/) for the "
                                        "fork's rows; default: the active build when it is the fork")
    p.add_argument("--collector", choices=["tbpw", "stock"], default="tbpw",
                   help="imatrix collector: tbpw (E[a^2] as stock's, plus E[a] for the fork) or stock llama-imatrix")
    p.add_argument("--candidates", help="candidate types of the error tables (names or the sets fork, extra); "
                                        "default: the fork's 20")
    p.add_argument("--extra-candidates", help="also a table with these types added (names or the set extra): "
                                              "its variants are named <metric>+x...")
    p.add_argument("--constraints", default="{}", help="tbpw's constraints as JSON, e.g. '{\"min_bpw\": {\"output\": 6}}'")
    p.add_argument("--probes", default="Q3_K", help="probe types of the sensitivity calibration")
    p.add_argument("--second-probes", help="also tables (+kld2p) from a calibration with these probe types, "
                   "e.g. Q3_K,Q5_K")
    p.add_argument("--grouping", default="tensor", choices=["tensor", "role"])
    p.add_argument("--interactions", action="store_true",
                   help="also make tables whose per-tensor scales are corrected by each role's joint KLD (+kldi)")
    p.add_argument("--strengths", default="1,0.5", help="calibration strengths (scale ** strength) to make tables of")
    p.add_argument("--refine-rounds", type=int, default=2, help="rounds of measured swaps after the selection (0: none)")
    p.add_argument("--refine-tries", type=int, default=4, help="swaps scored per round")
    p.add_argument("--chunks", type=int, default=100, help="evaluation chunks (held-out text)")
    p.add_argument("--cal-chunks", type=int, default=16, help="calibration chunks for calibration and selection")
    p.add_argument("--calibrate-chunks", type=int, default=0,
                   help="calibration chunks for the calibration alone (0: --cal-chunks; the recipes: 8)")
    p.add_argument("--imatrix-chunks", type=int, default=100)
    p.add_argument("--ctx", type=int, default=0, help="context (default 256 for bench, 512 otherwise)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sampling-scale", type=float, default=1.0, help="row sampling of the error measurement")
    p.add_argument("--no-store", dest="store", action="store_false", help="write every quant with llama-quantize")
    p.add_argument("--background", default=CalibrateOptions().background,
                   help="the type of the tensors a calibration probe leaves alone (float or e.g. Q8_0)")
    p.add_argument("--screen-chunks", type=int, default=ChooseOptions().screen_chunks,
                   help="the choice screens every plan on this many chunks first (0: none)")
    p.add_argument("--finalists", type=int, default=ChooseOptions().finalists)
    p.add_argument("--margin", type=float, default=ChooseOptions().margin,
                   help="a plan goes on from a round only if it may beat the leader by more than this part of its KLD")
    p.add_argument("--select-tables", choices=["all", "calibrated"], default=ChooseOptions().tables,
                   help="the tables whose plans tbpw-select chooses among (every variant is still evaluated)")
    p.add_argument("--work", default="/tmp/tbpw-quality")
    p.add_argument("--reuse", action="store_true",
                   help="keep the imatrix, logits and tables of an earlier run in --work (their times then read 'reused')")
    p.add_argument("--out", default=str(REPO / "docs" / "quality.md"))
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--dequantized-max-bpw", type=float, default=DEQUANTIZED_MAX_BPW,
                   help="smollm2: run only levels whose stock file is below this bpw (its source is Q4_1, 5.0 bpw; "
                        "rows that are not multiples of 256 push every stock type to 4.8+ bpw there)")
    p.add_argument("--loaded", action="store_true", help="say in the notes that the machine was loaded by other jobs")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    args.second_probes = [x.strip() for x in (args.second_probes or "").split(",") if x.strip()]
    for key in ("levels", "allocators", "metrics", "probes", "strengths"):
        setattr(args, key, [x.strip() for x in getattr(args, key).split(",") if x.strip()])
    args.strengths = [float(x) for x in args.strengths]
    args.candidates = [x.strip() for x in args.candidates.split(",") if x.strip()] if args.candidates else None
    args.extra_candidates = ([x.strip() for x in args.extra_candidates.split(",") if x.strip()]
                             if args.extra_candidates else None)
    args.constraints = json.loads(args.constraints)

    run = run_benchmark(args)
    text = markdown(run, args)
    print(text)
    write_section(Path(args.out), run.model, text)
    if args.json:
        from tbpw.files.atomic import write_json

        write_json(args.json, {"model": run.model, "stock_seconds": run.stock_seconds, "steps": run.steps,
                               "notes": run.notes, "selected": run.selected, "selections": run.selections,
                               "targets": run.targets,
                               "rows": [{"level": r.level, "variant": r.variant, "bpw": r.bpw, "seconds": r.seconds,
                                         "note": r.note, **{k if k != "seconds" else "kld_seconds": v for k, v in r.score.to_json().items()}}
                                        for r in run.rows]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
