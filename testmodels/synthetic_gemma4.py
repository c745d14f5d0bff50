"""A synthetic Gemma-4-26B-A4B: every tensor at its real name, shape and type, random weights, and a matching imatrix.

    .venv/bin/python -m testmodels.synthetic_gemma4 OUT.gguf [--layers N] [--seed S] [--imatrix OUT.imatrix.gguf] [--sparse]

Writes the F16 GGUF that llama.cpp b11312's convert_hf_to_gguf.py makes of google/gemma-4-26B-A4B
(dimensions: `GEMMA4_26B_A4B` below, their sources in docs/scale.md) with its first N layers (default: all
30, ~47 GiB), and, with --imatrix, an importance matrix in the format tbpw's collector writes (`in_sum2`,
`in_sum`, `counts` per weight and expert), so `tbpw measure` and `tbpw quantize` run without an inference pass.

- Names and shapes follow the converter: tensor names from gguf-py's gemma4 table, the fused
  `ffn_gate_up_exps` [2816, 1408, 128] and `ffn_down_exps` [704, 2816, 128] experts beside the dense MLP
  (`ffn_gate/up/down`), the F32 router `ffn_gate_inp` with its `.scale`, sliding layers with q/k/v at head size
  256 and 8 KV heads, full-attention layers (every sixth, and the last kept one, as transformers forces) at head
  size 512 with 2 KV heads and no `attn_v` (attention_k_eq_v), the tied 262,144 x 2816 `token_embd`.
- Weights: z + 0.15 z^3 of a standard normal z (heavy tails, kurtosis ~7), times a log-normal scale per row
  and per input column, at a magnitude of ~0.02. Deterministic: each block of rows has its own seed from
  (seed, tensor name, block), so a layer's tensors are the same whatever --layers says.
- Streaming: tensors are generated and written a block of rows at a time (16 Mi elements, 64 MB as float32);
  no tensor, let alone the model, is ever whole in memory. Written to OUT.partial, renamed when complete.
- The metadata is the converter's. Without a tokenizer (the default) the file is for measuring, allocating and
  quantizing (llama-quantize and tbpw need no vocabulary); `--tokenizer GGUF` copies that file's tokenizer (the
  tiny Gemma 4 fixture's gemma4 BPE, as the pinned converter writes it) padded with unused tokens to the
  262,144 of the embedding, and the tools that run the model load it (benchmarks/flagship.py).

`gemma4_layout(config, layers)` is the name/shape table; tests/test_synthetic_gemma4.py checks it against what
the pinned converter makes of the tiny Gemma 4 MoE fixture (tests/fixtures/tiny-moe-hf).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# google/gemma-4-26B-A4B's text_config (see docs/scale.md for where each value comes from).
GEMMA4_26B_A4B: dict[str, Any] = {
    "hidden_size": 2816,
    "intermediate_size": 2112,  # the dense MLP beside the experts
    "moe_intermediate_size": 704,
    "num_experts": 128,
    "top_k_experts": 8,
    "num_hidden_layers": 30,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,  # sliding-window layers
    "num_global_key_value_heads": 2,  # full-attention layers
    "head_dim": 256,
    "global_head_dim": 512,
    "attention_k_eq_v": True,  # full-attention layers have no v_proj: V is K
    "vocab_size": 262144,
    "tie_word_embeddings": True,
    "sliding_window": 1024,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "rope_parameters": {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
                        "sliding_attention": {"rope_theta": 10000.0}},
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
}

F32, F16 = 0, 1  # ggml type ids
BLOCK_ELEMENTS = 16 << 20
ALIGNMENT = 32
TOKENS = 100 * 512  # the synthetic imatrix's calibration tokens: 100 chunks of 512


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (the row length) first
    ggml_type: int  # F32 or F16
    kind: str  # "weight", "norm", "router", "ones", "rope_freqs"

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        return self.n_elements * (4 if self.ggml_type == F32 else 2)

    @property
    def matmul(self) -> bool:
        """Whether llama-imatrix records this tensor (a matrix multiplied with activations)."""
        return self.kind in ("weight", "router") and not self.name.startswith("token_embd")


def _layer_types(config: Mapping[str, Any], layers: int) -> list[str]:
    types = list(config["layer_types"])[:layers]
    types[-1] = "full_attention"  # transformers forces the last layer to full attention
    return types


def _full_head_dim(config: Mapping[str, Any]) -> int:
    """The converter's rule: `global_head_dim`, else the head_dim of the first full layer in per_layer_config."""
    if config.get("global_head_dim"):
        return int(config["global_head_dim"])
    for index, layer in sorted((config.get("per_layer_config") or {}).items(), key=lambda kv: int(kv[0])):
        if config["layer_types"][int(index)] == "full_attention" and "head_dim" in layer:
            return int(layer["head_dim"])
    raise ValueError("the config gives no head size for full-attention layers")


def gemma4_layout(config: Mapping[str, Any] = GEMMA4_26B_A4B, layers: int | None = None) -> list[TensorSpec]:
    """Every tensor the converter writes for a Gemma 4 MoE text model of this config, with its first `layers` layers."""
    layers = layers or int(config["num_hidden_layers"])
    n_embd, n_ff, n_ff_exp = config["hidden_size"], config["intermediate_size"], config["moe_intermediate_size"]
    n_expert, n_head = config["num_experts"], config["num_attention_heads"]
    hd_swa, hd_full = int(config["head_dim"]), _full_head_dim(config)
    kv_swa = config["num_key_value_heads"]
    kv_full = config.get("num_global_key_value_heads") or kv_swa
    specs = [TensorSpec("rope_freqs.weight", (hd_full // 2,), F32, "rope_freqs"),
             TensorSpec("token_embd.weight", (n_embd, config["vocab_size"]), F16, "weight")]
    for i, layer_type in enumerate(_layer_types(config, layers)):
        full = layer_type == "full_attention"
        hd, kv = (hd_full, kv_full) if full else (hd_swa, kv_swa)
        b = f"blk.{i}."
        specs += [TensorSpec(b + "attn_norm.weight", (n_embd,), F32, "norm"),
                  TensorSpec(b + "attn_q.weight", (n_embd, n_head * hd), F16, "weight"),
                  TensorSpec(b + "attn_k.weight", (n_embd, kv * hd), F16, "weight")]
        if not (full and config.get("attention_k_eq_v")):
            specs.append(TensorSpec(b + "attn_v.weight", (n_embd, kv * hd), F16, "weight"))
        specs += [TensorSpec(b + "attn_output.weight", (n_head * hd, n_embd), F16, "weight"),
                  TensorSpec(b + "attn_q_norm.weight", (hd,), F32, "norm"),
                  TensorSpec(b + "attn_k_norm.weight", (hd,), F32, "norm"),
                  TensorSpec(b + "post_attention_norm.weight", (n_embd,), F32, "norm"),
                  TensorSpec(b + "layer_output_scale.weight", (1,), F32, "ones"),
                  TensorSpec(b + "ffn_norm.weight", (n_embd,), F32, "norm"),
                  TensorSpec(b + "ffn_gate.weight", (n_embd, n_ff), F16, "weight"),
                  TensorSpec(b + "ffn_up.weight", (n_embd, n_ff), F16, "weight"),
                  TensorSpec(b + "ffn_down.weight", (n_ff, n_embd), F16, "weight"),
                  TensorSpec(b + "post_ffw_norm.weight", (n_embd,), F32, "norm"),
                  TensorSpec(b + "ffn_gate_inp.weight", (n_embd, n_expert), F32, "router"),
                  TensorSpec(b + "ffn_gate_inp.scale", (n_embd,), F32, "norm"),
                  TensorSpec(b + "pre_ffw_norm_2.weight", (n_embd,), F32, "norm"),
                  TensorSpec(b + "post_ffw_norm_1.weight", (n_embd,), F32, "norm"),
                  TensorSpec(b + "post_ffw_norm_2.weight", (n_embd,), F32, "norm"),
                  TensorSpec(b + "ffn_gate_up_exps.weight", (n_embd, 2 * n_ff_exp, n_expert), F16, "weight"),
                  TensorSpec(b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert), F16, "weight"),
                  TensorSpec(b + "ffn_down_exps.scale", (n_expert,), F32, "norm")]
    specs.append(TensorSpec("output_norm.weight", (n_embd,), F32, "norm"))
    return specs


def gemma4_metadata(config: Mapping[str, Any] = GEMMA4_26B_A4B, layers: int | None = None) -> dict[str, Any]:
    """The converter's gemma4 keys (no tokenizer): values are str, int (u32), float (f32) or lists (i32/bool arrays)."""
    layers = layers or int(config["num_hidden_layers"])
    types = _layer_types(config, layers)
    swa = [t == "sliding_attention" for t in types]
    hd_swa, hd_full = int(config["head_dim"]), _full_head_dim(config)
    kv_swa = config["num_key_value_heads"]
    kv_full = config.get("num_global_key_value_heads")
    rope = config["rope_parameters"]
    a = "gemma4."
    return {
        "general.architecture": "gemma4", "general.type": "model",
        "general.name": f"synthetic gemma-4-26B-A4B ({layers} layers)", "general.file_type": F16,
        a + "block_count": layers, a + "context_length": config["max_position_embeddings"],
        a + "embedding_length": config["hidden_size"], a + "feed_forward_length": config["intermediate_size"],
        a + "attention.head_count": config["num_attention_heads"],
        a + "attention.head_count_kv": [kv_swa if s else kv_full for s in swa] if kv_full else kv_swa,
        a + "rope.freq_base": float(rope["full_attention"]["rope_theta"]),
        a + "rope.freq_base_swa": float(rope["sliding_attention"]["rope_theta"]),
        a + "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        a + "expert_count": config["num_experts"], a + "expert_used_count": config["top_k_experts"],
        a + "attention.key_length": hd_full, a + "attention.value_length": hd_full,
        a + "final_logit_softcapping": float(config["final_logit_softcapping"]),
        a + "attention.sliding_window": config["sliding_window"], a + "attention.shared_kv_layers": 0,
        a + "embedding_length_per_layer_input": 0, a + "attention.sliding_window_pattern": swa,
        a + "attention.key_length_swa": hd_swa, a + "attention.value_length_swa": hd_swa,
        a + "expert_feed_forward_length": config["moe_intermediate_size"],
        a + "rope.dimension_count": hd_full, a + "rope.dimension_count_swa": hd_swa,
        "general.quantization_version": 2,
    }


UNUSED_TOKEN = 5  # gguf TokenType.UNUSED


def padded_tokenizer(source: Path, vocab: int = GEMMA4_26B_A4B["vocab_size"]) -> dict[str, Any]:
    """The `tokenizer.*` keys of the GGUF `source` (the tiny Gemma 4 fixture as the pinned converter writes it:
    the gemma4 BPE tokenizer), its vocabulary padded with unused tokens to `vocab`, the size of the model's
    embedding, so the tools that run the model load it. The padding is never produced by the tokenizer."""
    from gguf import GGUFReader

    fields = {k: f.contents() for k, f in GGUFReader(source).fields.items() if k.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"]
    if len(tokens) > vocab:
        raise ValueError(f"{source} has {len(tokens)} tokens, more than the model's {vocab}")
    pad = vocab - len(tokens)
    fields["tokenizer.ggml.tokens"] = tokens + [f"<unused{i}>" for i in range(pad)]
    fields["tokenizer.ggml.scores"] = [float(x) for x in fields["tokenizer.ggml.scores"]] + [0.0] * pad
    fields["tokenizer.ggml.token_type"] = list(fields["tokenizer.ggml.token_type"]) + [UNUSED_TOKEN] * pad
    return fields


# ----- GGUF encoding (version 3, little-endian) -----

def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(v: Any) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _string(v)
    if isinstance(v, list) and all(isinstance(x, bool) for x in v):
        return struct.pack("<IIQ", 9, 7, len(v)) + struct.pack(f"<{len(v)}?", *v)
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_string(x) for x in v)
    if isinstance(v, list) and v and all(isinstance(x, float) for x in v):
        return struct.pack("<IIQ", 9, 6, len(v)) + struct.pack(f"<{len(v)}f", *v)
    if isinstance(v, list):
        return struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(f"no GGUF encoding for {v!r}")


def _header(metadata: Mapping[str, Any], specs: list[TensorSpec]) -> tuple[bytes, list[int]]:
    """The bytes before the tensor data (padded to the alignment) and each tensor's offset in the data."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(specs), len(metadata)))
    for key, value in metadata.items():
        out += _string(key) + _value(value)
    offsets, offset = [], 0
    for s in specs:
        offsets.append(offset)
        out += _string(s.name) + struct.pack("<I", len(s.shape)) + struct.pack(f"<{len(s.shape)}Q", *s.shape)
        out += struct.pack("<IQ", s.ggml_type, offset)
        offset += -(-s.n_bytes // ALIGNMENT) * ALIGNMENT
    out += b"\0" * (-len(out) % ALIGNMENT)
    return bytes(out), offsets


# ----- values -----

def _rng(seed: int, name: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *more])


def _blocks(spec: TensorSpec, seed: int) -> Iterator[np.ndarray]:
    """The tensor's values, a block of rows at a time, as the float type it is stored in."""
    dtype = np.float32 if spec.ggml_type == F32 else np.float16
    if spec.kind == "rope_freqs":
        n_rot = int(spec.shape[0] * 2 * 0.25 / 2)  # the converter's proportional rope: 1 rotated, 1e30 not
        yield np.array([1.0] * n_rot + [1e30] * (spec.shape[0] - n_rot), dtype=dtype)
        return
    if spec.kind == "ones":
        yield np.ones(spec.shape, dtype=dtype)
        return
    if spec.kind == "norm":
        yield (1.0 + 0.1 * _rng(seed, spec.name).standard_normal(spec.n_elements)).astype(dtype)
        return
    ne0 = spec.shape[0]
    rows = spec.n_elements // ne0
    columns = np.exp(0.3 * _rng(seed, spec.name, 1 << 30).standard_normal(ne0, dtype=np.float32))
    step = max(1, BLOCK_ELEMENTS // ne0)
    for block, start in enumerate(range(0, rows, step)):
        n = min(step, rows - start)
        rng = _rng(seed, spec.name, block)
        z = rng.standard_normal((n, ne0), dtype=np.float32)
        z += np.float32(0.15) * z * z * z  # heavy tails
        z *= (np.float32(0.02) * np.exp(0.4 * rng.standard_normal((n, 1), dtype=np.float32))) * columns
        yield z.astype(dtype)


def write_model(path: Path, layers: int | None = None, seed: int = 0,
                config: Mapping[str, Any] = GEMMA4_26B_A4B, progress: bool = False, sparse: bool = False,
                tokenizer: Mapping[str, Any] | None = None) -> list[TensorSpec]:
    """Write the synthetic GGUF to `path` (through a temporary file, renamed when complete). `sparse`: only the
    header, the file extended to its full size with a hole (all-zero weights, no disk used): enough for whatever
    reads only the tensor table, such as `tbpw run --plan`. `tokenizer`: `tokenizer.*` keys (`padded_tokenizer`),
    for the tools that run the model."""
    specs = gemma4_layout(config, layers)
    header, offsets = _header({**gemma4_metadata(config, layers), **(tokenizer or {})}, specs)
    total = sum(s.n_bytes for s in specs)
    partial = path.with_name(path.name + ".partial")
    start, written = time.monotonic(), 0
    with open(partial, "wb") as fh:
        fh.write(header)
        if sparse:
            fh.truncate(len(header) + offsets[-1] + specs[-1].n_bytes)
        for spec, offset in zip(specs if not sparse else [], offsets):
            fh.write(b"\0" * (len(header) + offset - fh.tell()))
            for block in _blocks(spec, seed):
                fh.write(block.tobytes())
                written += block.nbytes
            if progress and spec.n_bytes > 64 << 20:
                print(f"\r{written / total:6.1%} {written / 1e9:6.2f} GB  {time.monotonic() - start:6.0f} s  {spec.name:40s}",
                      end="", file=sys.stderr, flush=True)
    partial.replace(path)
    if progress:
        print(file=sys.stderr)
    return specs


def write_imatrix(path: Path, layers: int | None = None, seed: int = 0,
                  config: Mapping[str, Any] = GEMMA4_26B_A4B) -> None:
    """An imatrix as tbpw's collector writes it for this model: per matmul weight and expert the sums of a^2
    and a over TOKENS tokens and the token count (experts get uneven shares of the top-k routed tokens)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path.with_name(path.name + ".partial"), arch="")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["synthetic"])
    writer.add_uint32("imatrix.chunk_count", TOKENS // 512)
    writer.add_uint32("imatrix.chunk_size", 512)
    top_k = config["top_k_experts"]
    for spec in gemma4_layout(config, layers):
        if not spec.matmul:
            continue
        rng = _rng(seed, spec.name, 1 << 31)
        experts = spec.shape[2] if len(spec.shape) == 3 else 1
        ncols = spec.shape[0]
        if experts > 1:  # both expert tensors of a layer see the same routing
            share = _rng(seed, spec.name.split(".ffn_")[0] + ".routing").gamma(2.0, size=experts)
            counts = np.floor(TOKENS * top_k * share / share.sum()).astype(np.float32)
        else:
            counts = np.full(1, TOKENS, dtype=np.float32)
        sq = np.exp(1.0 * rng.standard_normal((experts, ncols))).astype(np.float32)  # E[a^2], heavy-tailed columns
        sq[:, rng.choice(ncols, size=max(1, ncols // 256), replace=False)] *= 50.0  # a few outlier channels
        mean = np.sqrt(sq) * (0.3 * rng.standard_normal((experts, ncols))).astype(np.float32)  # E[a], |E[a]| < sqrt(E[a^2])
        shape2 = (experts, ncols) if experts > 1 else (ncols,)
        writer.add_tensor(spec.name + ".in_sum2", (sq * counts[:, None]).astype(np.float32).reshape(shape2))
        writer.add_tensor(spec.name + ".in_sum", (mean * counts[:, None]).astype(np.float32).reshape(shape2))
        writer.add_tensor(spec.name + ".counts", counts.reshape((experts, 1) if experts > 1 else (1,)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.with_name(path.name + ".partial").replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the GGUF to write")
    parser.add_argument("--layers", type=int, default=GEMMA4_26B_A4B["num_hidden_layers"], help="layers kept (1-30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imatrix", type=Path, help="also write a matching imatrix here")
    parser.add_argument("--tokenizer", type=Path,
                        help="a GGUF whose tokenizer to copy, padded to the model's vocabulary (the tiny Gemma 4 fixture as "
                             "the pinned converter writes it; benchmarks/flagship.py makes one): then the tools that "
                             "run the model (perplexity, imatrix, bench) load it")
    parser.add_argument("--sparse", action="store_true",
                        help="write only the header, the weights a hole of zeros (for `tbpw run --plan`; no disk used)")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= GEMMA4_26B_A4B["num_hidden_layers"]:
        raise SystemExit(f"--layers {args.layers}: give 1 to {GEMMA4_26B_A4B['num_hidden_layers']}")
    tokenizer = padded_tokenizer(args.tokenizer) if args.tokenizer else None
    specs = write_model(args.out, args.layers, args.seed, progress=not args.sparse, sparse=args.sparse,
                        tokenizer=tokenizer)
    if args.imatrix:
        write_imatrix(args.imatrix, args.layers, args.seed)
    size = sum(s.n_bytes for s in specs)
    print(json.dumps({"model": str(args.out), "layers": args.layers, "tensors": len(specs), "f16_bytes": size,
                      "elements": sum(s.n_elements for s in specs),
                      "largest_tensor_bytes": max(s.n_bytes for s in specs)}))


if __name__ == "__main__":
    main()
