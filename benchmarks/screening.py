#!/usr/bin/env python3
"""Replay the choice's screening rules on kept per-chunk calibration scores: which plan each rule would choose,
and how many chunks it would score, against scoring every plan on every chunk.

    .venv/bin/python benchmarks/screening.py RUN.json [RUN.json ...] [--candidates LABEL,...]
        [--rule K,F,M ...]

Each RUN.json is the `--json` output of benchmarks/quality.py: every candidate's calibration score per chunk
(`selections.<level>.all_scores`) and every variant's evaluation KLD (`rows`). A rule is (screen_chunks K,
finalists F, margin M); the replay runs the production rule (`tbpw.select.scoring.finalists`) round by round
as `select_plan` does, on the scores the candidates already have, so it costs no KLD run. Plans with the same
per-chunk scores (the same file) are counted once. docs/quality.md gives the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tbpw.llamacpp.perplexity import KldScore
from tbpw.select.scoring import finalists

CALIBRATED = ("knapsack/wmse+kld", "lagrangian/wmse+kld", "knapsack/wmse+kld0.5", "lagrangian/wmse+kld0.5")
RULES = ((4, 2, 0.0), (4, 2, 0.02), (2, 2, 0.02), (4, 1, 0.0), (2, 3, 0.02))


def score_on(chunks: list[float]) -> KldScore:
    return KldScore(round(sum(chunks) / len(chunks), 6), 0.0, 0.0, 0.0, 0.0, 0.0, tuple(chunks))


def replay(per_chunk: dict[str, list[float]], order: list[str], screen: int, limit: int, margin: float,
           total: int) -> tuple[str, int]:
    """The plan `select_plan` would choose with this rule, and the chunks it would score."""
    step = screen if 0 < screen < total and len(order) > 1 else total
    alive, cost, stop = list(order), 0, 0
    for start in range(0, total, step):
        stop = min(start + step, total)
        cost += (stop - start) * len(alive)
        scores = {n: score_on(per_chunk[n][:stop]) for n in alive}
        if stop == total:
            break
        alive = finalists(scores, order, limit, margin)
        if len(alive) == 1:
            return alive[0], cost
    return min(alive, key=lambda n: (score_on(per_chunk[n][:stop]).kld_mean, order.index(n))), cost


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--candidates", default=",".join(CALIBRATED), help="the variants the choice is among")
    p.add_argument("--rule", action="append", default=[], metavar="K,F,M",
                   help="screen_chunks, finalists, margin (repeatable; default: the rules of docs/quality.md)")
    args = p.parse_args()
    rules = [(int(k), int(f), float(m)) for k, f, m in (r.split(",") for r in args.rule)] or list(RULES)
    wanted = args.candidates.split(",")
    totals = {rule: [0, 0] for rule in rules}  # chunks scored, choices that differ from scoring everything
    for path in args.runs:
        run = json.loads(path.read_text())
        evaluation = {(r["level"], r["variant"]): r["kld_mean"] for r in run["rows"]}
        for level, selection in run["selections"].items():
            labels, kept = selection["labels"], selection["all_scores"]
            order, seen = [], set()
            for name, label in labels.items():
                if label in wanted and name in kept and tuple(kept[name]["chunk_kld"]) not in seen:
                    seen.add(tuple(kept[name]["chunk_kld"]))
                    order.append(name)
            per_chunk = {n: kept[n]["chunk_kld"] for n in order}
            total = min(len(c) for c in per_chunk.values())
            everything, _ = replay(per_chunk, order, 0, len(order), 0.0, total)
            cells = []
            for rule in rules:
                chosen, cost = replay(per_chunk, order, *rule, total)
                ratio = evaluation[(level, labels[chosen])] / evaluation[(level, labels[everything])]
                totals[rule][0] += cost
                totals[rule][1] += chosen != everything
                cells.append(f"{rule}: {labels[chosen]} x{ratio:.4f} ({cost} chunks)")
            print(f"{path.name} {level} ({len(order)} plans): " + "; ".join(cells))
    for rule, (cost, differ) in totals.items():
        print(f"rule {rule}: {cost} chunks scored, {differ} choices differ from scoring every plan on every chunk")


if __name__ == "__main__":
    main()
