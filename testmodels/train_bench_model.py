#!/usr/bin/env python3
"""Train (once) and cache tbpw's benchmark models: small llamas with genuine float weights.

    .venv/bin/python -m testmodels.train_bench_model [--model bench|bench-odd] [--measure] [--device cpu|cuda]

Prints the cached model's GGUF path and facts (training time, parameters, held-out perplexity); trains it
first when the cache (~/.cache/tbpw/bench-model/<hash of the settings>/) does not hold it. The settings,
data sources and held-out guarantee are described in testmodels/training/bench_model.py. --measure only reports this
machine's training throughput for the configured shape, to size `steps` (640 took 15.4 minutes on 2 cores).
--model bench-odd trains the second model (hidden 384, grouped-query attention: widths that make K and IQ
types fall back, as in real models).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="report training tokens/s and the implied run time")
    parser.add_argument("--model", choices=["bench", "bench-odd"], default="bench",
                        help="bench: rows of multiples of 256; bench-odd: hidden 384 with grouped-query attention")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: the reference model of docs/results/quality.md; cuda: about a minute on a GPU, other weights")
    args = parser.parse_args()

    from testmodels.training import bench_model

    settings = bench_model.settings_for(args.device, bench_model.MODELS[args.model])
    if args.measure:
        rate = bench_model.tokens_per_second(settings)
        tokens = settings["steps"] * settings["batch"] * settings["seq"]
        print(f"{rate:.0f} tokens/s: {settings['steps']} steps of {settings['batch']} x {settings['seq']} "
              f"would take {tokens / rate / 60:.1f} min")
        return
    start = time.monotonic()
    model = bench_model.bench_model(settings=settings, log=lambda line: print(line, flush=True))
    facts = {k: v for k, v in model.manifest.items() if k not in ("settings", "attribution")}
    print(json.dumps(facts, indent=1))
    print(f"{model.gguf}  ({time.monotonic() - start:.0f} s this run)")


if __name__ == "__main__":
    main()
