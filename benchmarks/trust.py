#!/usr/bin/env python3
"""What checking the tensor store on read costs: one plan's blobs checked against their seals, against writing that
plan's GGUF from them (the ratio a user pays for trusting nothing on disk).

    .venv/bin/python -m benchmarks.trust [--work DIR] [--type Q4_K] [--template TINY.gguf]

On the synthetic 214 M llama of benchmarks/cost.py (random F16 weights, 4 layers of 2048 x 5632): every quantizable
tensor is quantized into a fresh store as `--type` (its blobs sealed as they are written), then the plan's file is
assembled from them three ways, each timed: the blobs checked cold (this process has not seen them: each blob is
hashed once and remembered), checked warm (a `stat` and a look-up each), and (the baseline) the same assembly with the
check taken out. Prints seconds and the ratios to the baseline; docs/reliability.md gives the figures.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/tbpw-trust")
    p.add_argument("--type", default="Q4_K")
    p.add_argument("--template", default=str(Path(os.environ.get("TBPW_SHARED", REPO.parent / "shared"))
                                             / "fixtures" / "fork-tiny" / "tiny-f16.gguf"),
                   help="the GGUF whose tokenizer the 214 M model takes (the fork's tiny model)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from testmodels.gguf_writers import write_llama_like

    model = work / "synthetic-2048x5632x4.gguf"
    if not model.is_file():
        write_llama_like(model, Path(args.template), n_embd=2048, n_ff=5632, n_layer=4, seed=1)

    from tbpw.files import digest, sealed
    from tbpw.quantize import store as store_mod
    from tbpw.quantize.assemble import assemble
    from tbpw.quantize.store import TensorStore

    root = work / f"store-{time.strftime('%H%M%S')}"
    source = TensorStore(root, threads=os.cpu_count()).source(model, None)
    types = {t.name: source.inventory[t.name].effective_type(args.type)
             for t in source.inventory.tensors if t.quantizable}
    start = time.monotonic()
    for name, t in types.items():
        source.ensure(name, t)
    made = time.monotonic() - start
    blob_bytes = sum(source.path(n, t).stat().st_size for n, t in types.items())

    def assembly() -> float:
        start = time.monotonic()
        assemble(TensorStore(root).source(model, None), types, work / "plan.gguf")
        return time.monotonic() - start

    def unchecked() -> float:
        real = sealed.trusted
        store_mod.sealed.trusted = lambda path, what, note=None: Path(path).is_file()  # type: ignore[assignment]
        try:
            return assembly()
        finally:
            store_mod.sealed.trusted = real  # type: ignore[assignment]

    digest._memo = {}  # a process that has not seen the blobs: each is hashed once
    digest._memo_path().unlink(missing_ok=True)
    cold = assembly()
    warm = base = float("inf")
    for _ in range(3):  # alternated, best of three: other jobs' load and the page cache touch both alike
        warm, base = min(warm, assembly()), min(base, unchecked())
    hashed = time.monotonic()
    for n, t in types.items():
        digest.sha256_file(source.path(n, t))
    hashing = time.monotonic() - hashed
    for label, seconds in (("assemble, blobs checked cold", cold), ("assemble, blobs checked warm", warm),
                           ("assemble, no check (the baseline)", base), ("sha256 of every blob", hashing)):
        print(f"{label:<44} {seconds:8.3f} s")
    print(f"\n{len(types)} blobs, {blob_bytes / 2**20:.1f} MiB as {args.type}; quantizing them (sealed as written) took "
          f"{made:.1f} s, of which hashing is about {hashing:.2f} s ({hashing / made:.1%})")
    print(f"checked cold: {cold / base:.2f}x the baseline; warm: {warm / base:.2f}x")
    (work / "plan.gguf").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
