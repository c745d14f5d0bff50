#!/usr/bin/env python3
"""Make tbpw's tiny mixture-of-experts test model: a Gemma 4 MoE in Hugging Face format.

    .venv/bin/python -m testmodels.make_tiny_moe [--out tests/fixtures/tiny-moe-hf] [--steps 10]

Gemma 4's MoE layout, as in gemma-4-26B-A4B, at toy size: each layer has a dense MLP beside a router
and 4 experts (top-2) stored as 3-D tensors; the pinned convert_hf_to_gguf.py writes them as
`ffn_gate_up_exps` [256, 512, 4] and `ffn_down_exps` [256, 256, 4], so llama-imatrix records
per-expert counts. Two layers (one sliding-window, one full attention with a wider head), hidden 256,
vocab 4096 (the tiny llama's SentencePiece recipe as a byte-fallback BPE tokenizer.json): every weight
row is a multiple of 256 elements. Seeded initialisation, then a few seeded training steps on the
Wikipedia calibration split, with a load-balancing loss so that every expert keeps getting tokens.
bf16 safetensors, ~7 MB.

Needs the `convert` extra (torch, transformers, sentencepiece, safetensors; tokenizers comes with transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from testmodels.make_tiny_llama import encode, train_tokenizer  # the same tokenizer recipe

REPO = Path(__file__).resolve().parent.parent

SEED = 4321
THREADS = 2
SEQ, BATCH = 128, 8
BALANCE = 0.1  # weight of the load-balancing loss


def write_tokenizer(sp_model: Path, out: Path) -> None:
    """A tokenizer.json (BPE with byte fallback) equivalent to the SentencePiece model: Gemma 4's converter reads that."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    spm = SentencePieceExtractor(str(sp_model)).extract(BPE)
    tok = Tokenizer(BPE(vocab=spm["vocab"], merges=spm["merges"], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "tiny-moe-hf")
    parser.add_argument("--steps", type=int, default=10, help=f"training steps of {BATCH} x {SEQ} tokens (0: seeded random weights)")
    args = parser.parse_args()

    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from tbpw.data import assets

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    wiki = assets.wiki_split()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        sp_model = train_tokenizer(wiki.calibration, Path(tmp))
        write_tokenizer(sp_model, out)
        ids = torch.tensor(encode(sp_model, wiki.calibration.read_text(encoding="utf-8")))

    config = Gemma4TextConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
        layer_types=["sliding_attention", "full_attention"], sliding_window=128,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=4096,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=256,
        final_logit_softcapping=30.0, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.architectures = ["Gemma4ForCausalLM"]
    model = Gemma4ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())

    # transformers computes no load-balancing loss for Gemma 4: without one, ten steps collapse the
    # router onto one or two experts (measured: imatrix counts 1007/17/1024/0). The routers' outputs are
    # collected here for the Switch Transformer balancing loss (E * sum_i f_i * P_i).
    routed: list[tuple] = []
    for layer in model.model.layers:
        layer.router.register_forward_hook(lambda _m, _i, out: routed.append(out))

    def balance_loss() -> torch.Tensor:
        total = torch.zeros(())
        for probs, _, top_k in routed:
            chosen = torch.nn.functional.one_hot(top_k, probs.shape[-1]).sum(1).float().mean(0) / top_k.shape[-1]
            total = total + probs.shape[-1] * (chosen * probs.mean(0)).sum()
        routed.clear()
        return total

    start = time.monotonic()
    if args.steps:
        windows = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(SEED))
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        model.train()
        for step in range(args.steps):
            batch = windows[order[step * BATCH:(step + 1) * BATCH]]
            loss = model(input_ids=batch, labels=batch).loss
            (loss + BALANCE * balance_loss()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step:3d}  loss {loss.item():.3f}  {time.monotonic() - start:5.1f} s", flush=True)
    seconds = time.monotonic() - start

    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}
    (out / "MODEL.md").write_text(
        "# tiny-moe-hf: tbpw's tiny Gemma 4 mixture-of-experts test model\n\n"
        f"Made by `python -m testmodels.make_tiny_moe --steps {args.steps}` (seed {SEED}, {THREADS} CPU threads, {seconds:.0f} s of training): "
        f"{n_params / 1e6:.2f} M parameters, Gemma4ForCausalLM, 2 layers (sliding + full attention), hidden 256, "
        "dense MLP 256 beside 4 experts (top-2) of width 256, vocab 4096, tied embeddings, bf16 weights.\n\n"
        + (f"Trained {args.steps} steps of {BATCH} x {SEQ} tokens on the calibration side of tbpw's Wikipedia split "
           f"with a load-balancing loss (weight {BALANCE}); barely trained: it is a shape test, not a language model.\n\n" if args.steps else "Seeded random weights.\n\n")
        + f"Training text: {wiki.attribution}\n\n"
        "sha256 of the files written:\n\n" + "".join(f"- `{name}`: `{digest}`\n" for name, digest in digests.items()))
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out}: {n_params / 1e6:.2f} M parameters, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
