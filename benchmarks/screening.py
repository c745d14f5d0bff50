#!/usr/bin/env python3
"""Replay the choice's screening rules on kept per-chunk calibration scores: which plan each rule would choose,
and how many chunks it would score, against scoring every plan on every chunk.

    .venv/bin/python -m benchmarks.screening RUN.json [RUN.json ...] [--candidates LABEL,...]
        [--rule K,F,M ...]

Each RUN.json is the `--json` output of benchmarks/quality.py for a run whose choice scored every candidate on every
chunk (`--set choose.screen_chunks=0`): each level's choose stage records every distinct candidate's calibration
score per chunk (`choices.<level>.scores`). A rule is (screen_chunks K, finalists F, margin M); the replay runs the
production rule (`tbpw.select.scoring.finalists`) round by round as `select_plan` does, on the scores the
candidates already have, so it costs no KLD run. Each choice is compared with scoring every plan on every chunk by
the calibration KLD of the plan it picks, on all the chunks. docs/results/quality.md gives the results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tbpw.llamacpp.perplexity import KldScore
from tbpw.select.scoring import finalists

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
    p.add_argument("--rule", action="append", default=[], metavar="K,F,M",
                   help="screen_chunks, finalists, margin (repeatable; default: the rules of docs/results/quality.md)")
    args = p.parse_args()
    rules = [(int(k), int(f), float(m)) for k, f, m in (r.split(",") for r in args.rule)] or list(RULES)
    totals = {rule: [0, 0] for rule in rules}  # chunks scored, choices that differ from scoring everything
    for path in args.runs:
        run = json.loads(path.read_text())
        for level, choice in run["choices"].items():
            per_chunk = {n: s["chunk_kld"] for n, s in choice["scores"].items() if s.get("chunk_kld")}
            order = list(per_chunk)
            if len(order) < 2:
                continue
            total = min(len(c) for c in per_chunk.values())
            everything, _ = replay(per_chunk, order, 0, len(order), 0.0, total)
            cells = []
            for rule in rules:
                chosen, cost = replay(per_chunk, order, *rule, total)
                ratio = score_on(per_chunk[chosen][:total]).kld_mean / score_on(per_chunk[everything][:total]).kld_mean
                totals[rule][0] += cost
                totals[rule][1] += chosen != everything
                cells.append(f"{rule}: {chosen} x{ratio:.4f} ({cost} chunks)")
            print(f"{path.name} {level} ({len(order)} plans): " + "; ".join(cells))
    for rule, (cost, differ) in totals.items():
        print(f"rule {rule}: {cost} chunks scored, {differ} choices differ from scoring every plan on every chunk")


if __name__ == "__main__":
    main()
