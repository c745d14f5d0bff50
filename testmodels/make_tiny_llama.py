#!/usr/bin/env python3
"""Train tbpw's tiny llama test model (Hugging Face format) on the demo's Wikipedia CALIBRATION split.

    .venv/bin/python -m testmodels.make_tiny_llama [--out tests/fixtures/tiny-llama-hf] [--steps 110]

Writes safetensors (bf16) + config.json + a SentencePiece tokenizer.model: hidden 256, 4 layers,
4 heads, ffn 768, tied embeddings, BPE vocab 4096 with byte fallback and split digits. Every weight
row is a multiple of 256 elements, so every quantization type applies to every tensor. Training is
seeded and runs on 2 CPU threads (about 2 minutes); the evaluation split is never seen, and the
held-out perplexity is printed and recorded in TRAINING.md.

Needs the `convert` extra (torch, transformers, sentencepiece, safetensors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from testmodels.training import tokenizer
from testmodels.training.lm import heldout_perplexity, train_steps
from testmodels.training.tokenizer import encode

REPO = Path(__file__).resolve().parent.parent

VOCAB = 4096
HIDDEN, LAYERS, HEADS, FFN = 256, 4, 4, 768
SEQ, BATCH = 256, 16
SEED = 1234
THREADS = 2


def train_tokenizer(text_file: Path, out_dir: Path) -> Path:
    return tokenizer.train_tokenizer(text_file, out_dir, VOCAB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "tiny-llama-hf")
    parser.add_argument("--steps", type=int, default=110, help="optimizer steps of 16 x 256 tokens")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tbpw.data import assets

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    wiki = assets.wiki_split()
    with tempfile.TemporaryDirectory() as tmp:
        tok_model = train_tokenizer(wiki.calibration, Path(tmp))
        train_ids = torch.tensor(encode(tok_model, wiki.calibration.read_text(encoding="utf-8")))
        eval_ids = torch.tensor(encode(tok_model, wiki.evaluation.read_text(encoding="utf-8")))
        tok_bytes = tok_model.read_bytes()
    print(f"tokens: {len(train_ids)} calibration, {len(eval_ids)} evaluation (held out)")

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         rope_theta=10000.0, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M")

    windows = train_ids[: len(train_ids) // SEQ * SEQ].view(-1, SEQ)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(SEED))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    seconds, _ = train_steps(model, windows, order, opt, steps=args.steps, batch=BATCH,
                             warmup=max(1, args.steps // 10), log=lambda line: print(line, flush=True))
    ppl, n_windows = heldout_perplexity(model, eval_ids, SEQ, 64)
    print(f"held-out perplexity ({n_windows} x {SEQ} tokens of the evaluation split): {ppl:.1f}")

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.model").write_bytes(tok_bytes)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048}, indent=1) + "\n")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}
    (out / "TRAINING.md").write_text(
        "# tiny-llama-hf: tbpw's tiny trained llama test model\n\n"
        f"Made by `python -m testmodels.make_tiny_llama --steps {args.steps}` (seed {SEED}, {THREADS} CPU threads, "
        f"{seconds:.0f} s): {n_params / 1e6:.2f} M parameters, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, "
        f"ffn {FFN}, tied embeddings, SentencePiece BPE vocab {VOCAB} (byte fallback, split digits), bf16 weights.\n\n"
        f"Trained for {args.steps} steps of {BATCH} x {SEQ} tokens on the calibration side of tbpw's Wikipedia split "
        f"only; held-out perplexity on the evaluation side: {ppl:.1f} (uniform guessing: {VOCAB}).\n\n"
        f"Training text: {wiki.attribution}\n\n"
        "sha256 of the files written:\n\n" + "".join(f"- `{name}`: `{digest}`\n" for name, digest in digests.items()))
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
