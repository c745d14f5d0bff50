"""Small GGUF files written for tests with the gguf package: odd-width llamas, 3-D expert tensors, imatrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def write_llama_like(path: Path, template: Path, n_embd: int, n_ff: int, n_layer: int = 2, seed: int = 0) -> Path:
    """A llama with the template's tokenizer and random F16 weights of the given widths.

    llama-quantize reads only metadata and tensors, so any width works: one that 256 (or 32) does not
    divide makes it fall back to other types, which is what the tests check.
    """
    src = GGUFReader(template)
    n_vocab = int(src.get_field("llama.vocab_size").contents())
    n_head = 4
    override = {"llama.embedding_length": n_embd, "llama.feed_forward_length": n_ff, "llama.block_count": n_layer,
                "llama.attention.key_length": n_embd // n_head, "llama.attention.value_length": n_embd // n_head,
                "llama.rope.dimension_count": n_embd // n_head, "general.name": f"odd {n_embd}x{n_ff}"}
    w = GGUFWriter(str(path), "llama")
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = override.get(key, field.contents())
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, value, field.types[0], sub_type=sub)
    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16)

    w.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    _finish(w)
    return path


def write_expert_tensor_file(path: Path, n_cols: int, n_rows: int, n_experts: int, seed: int = 0,
                             name: str = "blk.0.ffn_down_exps.weight") -> Path:
    """A GGUF holding one 3-D F16 expert tensor [n_experts, n_rows, n_cols] whose experts differ in scale."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n_experts, n_rows, n_cols)) * (1.0 + np.arange(n_experts))[:, None, None]
    w = GGUFWriter(str(path), "llama")
    w.add_tensor(name, data.astype(np.float16))
    _finish(w)
    return path


def write_imatrix(path: Path, entries: dict[str, dict[str, np.ndarray]], chunk_size: int = 256) -> Path:
    """A GGUF imatrix: per tensor `in_sum2` [n_expert, ncols], `counts` [n_expert], optional `in_sum`."""
    w = GGUFWriter(str(path), "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["test"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name, parts in entries.items():
        w.add_tensor(f"{name}.in_sum2", np.asarray(parts["in_sum2"], dtype=np.float32))
        if "in_sum" in parts:
            w.add_tensor(f"{name}.in_sum", np.asarray(parts["in_sum"], dtype=np.float32))
        w.add_tensor(f"{name}.counts", np.asarray(parts["counts"], dtype=np.float32).reshape(-1, 1))
    _finish(w)
    return path


def write_large_vocabulary(path: Path, n: int = 262_144) -> Path:
    """A GGUF whose metadata holds a Gemma-sized vocabulary (`n` tokens and scores) beside one small tensor."""
    w = GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(n)])
    w.add_array("tokenizer.ggml.scores", np.arange(n, dtype=np.float32).tolist())
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    _finish(w)
    return path


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
