"""The models and problems tbpw's tests and benchmarks run on, made here rather than downloaded.

Dev tooling, not part of the installed package (pyproject lists no `testmodels`); run from the repository root:

- `gguf_writers`: small GGUF files written with the gguf package (odd-width llamas, 3-D expert tensors,
  a large vocabulary, imatrices);
- `synthetic_gemma4`: the Gemma-4-26B-A4B tensor layout at any depth, with an imatrix
  (`python -m testmodels.synthetic_gemma4 OUT.gguf`);
- `problems`: allocation problems with the shapes of real models (a 26B MoE);
- `make_tiny_llama`, `make_tiny_moe`: the trained fixtures under tests/fixtures/
  (`python -m testmodels.make_tiny_llama`, `python -m testmodels.make_tiny_moe`);
- `training`: the code that trains them and the benchmark models of docs/results/quality.md
  (`python -m testmodels.train_bench_model`).
"""
