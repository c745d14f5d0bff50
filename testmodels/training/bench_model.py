"""tbpw's benchmark models: small llamas with GENUINE float weights, trained here, cached.

Quality comparisons need a model whose float weights are real: a dequantized checkpoint makes its own
source types lossless (see ../shared/reference/assets.md, the caveat). This module trains two (MODELS):

- `bench`: a llama (hidden 256, 8 layers, 4 heads, ffn 768, untied output, ~11 M parameters), every
  row a multiple of 256 elements so that every quantization type applies to every tensor;
- `bench-odd`: the same recipe at real-model widths (hidden 384, 8 layers, 6 query heads sharing 2 KV
  heads (grouped-query attention), ffn 1024, ~19 M parameters): rows of 384 fit no 256-element K or IQ
  block, so those types fall back to 32-element ones there (IQ4_NL, Q4_0, Q5_0, ...), as on SmolLM2 (576),
  Gemma (640) or Qwen (896); 480 steps, sized by its ~1.8x cost per step to stay within the same time;
- a SentencePiece BPE vocabulary of 8192 (byte fallback, split digits) trained on the same text;
- English text from pinned sources: the CALIBRATION side of tbpw's Wikipedia split, the C4 and
  TinyStories samples of exllamav2 0.3.2, and Debian's dict-gcide dictionary. The Wikipedia EVALUATION
  side is never in the training text (asserted line by line), so perplexity and KL divergence measured
  on it are held out.

Training is seeded and deterministic (torch deterministic algorithms, 2 threads; a retrain gives the same
bytes). 640 steps of `bench` took 15.4 minutes on 2 CPU cores here, which leaves room under the 30-minute
limit for a machine that is also doing other work. The result lives under the cache's bench-model/<key>/,
the key a hash of the model's settings: the Hugging Face folder (hf/), its F16 GGUF (bench-f16.gguf) and
manifest.json.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tbpw.data import assets
from tbpw.errors import TbpwError
from tbpw.files import digest, paths, pinned
from tbpw.files.atomic import publish_folder, write_json, write_text
from testmodels.training.lm import heldout_perplexity, train_steps
from testmodels.training.tokenizer import encode, train_tokenizer

# Everything that shapes the result: the cache key is a hash of this (bump "version" when code changes it).
SETTINGS: dict = {
    "version": 1,
    "vocab": 8192, "hidden": 256, "layers": 8, "heads": 4, "kv_heads": 4, "ffn": 768, "tied": False,
    "seq": 256, "batch": 8, "steps": 640, "lr": 3e-3, "warmup": 30, "weight_decay": 0.1,
    "seed": 1234, "threads": 2,
    # characters taken from each source (all of a source when it is shorter)
    "chars": {"wiki-calibration": 10_000_000, "c4": 10_000_000, "tiny": 10_000_000, "gcide": 1_500_000},
    "tokenizer_chars": 2_000_000,
    "gcide": {"package": "dict-gcide", "version": "0.48.5+nmu2",
              "sha256": "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
              "member": "usr/share/dictd/gcide.dict.dz"},
    "exllamav2_files": {"c4": "exllamav2/conversion/standard_cal_data/c4.utf8",
                        "tiny": "exllamav2/conversion/standard_cal_data/tiny.utf8"},
    "eval_windows": 64,
}

# The second benchmark model: real-model widths (see the module doc). Everything else as SETTINGS.
ODD_SETTINGS: dict = {**SETTINGS, "hidden": 384, "heads": 6, "kv_heads": 2, "ffn": 1024, "steps": 480}
MODELS: dict[str, dict] = {"bench": SETTINGS, "bench-odd": ODD_SETTINGS}

GCIDE_ATTRIBUTION = ("GNU Collaborative International Dictionary of English 0.48 (GPL), from Debian's dict-gcide "
                     "package 0.48.5+nmu2")
MIN_CHECKED_LINE = 40  # eval lines shorter than this ("References", dates) may legitimately occur anywhere


def settings_for(device: str, settings: dict = SETTINGS) -> dict:
    """The settings of a model trained on `device` ("cpu" or "cuda"). CPU training is the reference (the
    published numbers); a GPU rounds differently, so its weights differ and get a cache key of their own."""
    if device not in ("cpu", "cuda"):
        raise TbpwError(f"unknown training device {device!r}: use cpu or cuda")
    return settings if device == "cpu" else {**settings, "device": device}


def settings_key(settings: dict = SETTINGS) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cache_folder(settings: dict = SETTINGS) -> Path:
    return paths.home() / "bench-model" / settings_key(settings)


@dataclass(frozen=True)
class BenchModel:
    folder: Path
    hf: Path
    gguf: Path
    manifest: dict


# ---------------------------------------------------------------- text


def gcide_text(settings: dict = SETTINGS) -> str:
    """The dictionary's entries as plain paragraphs (one entry a paragraph), from the pinned Debian package."""
    spec = settings["gcide"]
    folder = paths.downloads()
    folder.mkdir(parents=True, exist_ok=True)
    deb = folder / f"{spec['package']}_{spec['version']}_all.deb"
    if not deb.is_file() or digest.sha256_file(deb) != spec["sha256"]:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            proc = subprocess.run(["apt-get", "download", f"{spec['package']}={spec['version']}"], cwd=tmp,
                                  capture_output=True, text=True)
            got = list(Path(tmp).glob("*.deb"))
            if proc.returncode != 0 or not got:
                raise TbpwError(f"apt-get download {spec['package']}={spec['version']} failed "
                                f"({proc.stderr.strip().splitlines()[-1:] or 'no .deb'}): run apt-get update, or place the .deb in {folder}")
            got[0].rename(deb)
    if (actual := digest.sha256_file(deb)) != spec["sha256"]:
        raise TbpwError(f"{deb} has sha256 {actual}, not the pinned {spec['sha256']}: delete it and rerun")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        raw = gzip.decompress((Path(tmp) / spec["member"]).read_bytes()).decode("utf-8", errors="replace")
    return clean_gcide(raw)


def clean_gcide(raw: str) -> str:
    """Entries with their line breaks and source tags removed; the database's header entries dropped."""
    entries = []
    for block in re.split(r"\n\s*\n", raw):
        text = re.sub(r"\[(?:1913 Webster|WordNet 1\.5|PJC|Century Dict\.|Webster 1913 Suppl\.)[^\]]*\]", "", block)
        text = " ".join(text.split())
        if len(text) > 40 and not text.startswith("00-database") and "\\" in text[:80]:
            entries.append(text)
    return "\n\n".join(entries) + "\n"


def spread_sample(text: str, budget: int) -> str:
    """About `budget` characters of whole paragraphs taken evenly over `text` (all of it when shorter)."""
    if len(text) <= budget:
        return text
    paragraphs = text.split("\n\n")
    stride = len(text) / budget
    return "\n\n".join(paragraphs[int(i * stride)] for i in range(int(len(paragraphs) / stride))) + "\n"


def training_sources(settings: dict = SETTINGS) -> dict[str, str]:
    wiki = assets.wiki_split()
    pin = assets.pinned_file("wiki")
    archive = pinned.fetch_pinned(pin.archive)
    texts = {"wiki-calibration": wiki.calibration.read_text(encoding="utf-8")}
    for name, member in settings["exllamav2_files"].items():
        texts[name] = pinned.read_member(archive, member).decode("utf-8")
    texts["gcide"] = gcide_text(settings)
    return {name: spread_sample(text, settings["chars"][name]) for name, text in texts.items()}


def drop_shared_lines(text: str, evaluation: str) -> tuple[str, int]:
    """`text` without the lines that also occur in the evaluation text (boilerplate sentences that different
    Wikipedia articles share, e.g. the same climate paragraph in two towns' articles); returns the count dropped."""
    held = {line.strip() for line in evaluation.splitlines() if len(line.strip()) >= MIN_CHECKED_LINE}
    kept, dropped = [], 0
    for line in text.splitlines():
        if line.strip() in held:
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept) + "\n", dropped


def assert_held_out(training: str, evaluation: str) -> int:
    """Fail unless no line of the evaluation text (of MIN_CHECKED_LINE characters or more) is in `training`.

    Returns the number of evaluation lines checked.
    """
    seen = {line.strip() for line in training.splitlines()}
    checked = [line.strip() for line in evaluation.splitlines() if len(line.strip()) >= MIN_CHECKED_LINE]
    leaked = [line for line in checked if line in seen]
    if leaked:
        raise AssertionError(f"{len(leaked)} evaluation lines are in the training text, e.g. {leaked[0][:80]!r}")
    if not checked:
        raise AssertionError("the evaluation text has no line long enough to check")
    return len(checked)


# ---------------------------------------------------------------- training


def _train_tokenizer(text: str, out_dir: Path, vocab: int) -> Path:
    source = out_dir / "tokenizer-text.txt"
    source.write_text(text, encoding="utf-8")
    return train_tokenizer(source, out_dir, vocab)


def _make_model(settings: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=settings["vocab"], hidden_size=settings["hidden"],
                         intermediate_size=settings["ffn"], num_hidden_layers=settings["layers"],
                         num_attention_heads=settings["heads"], num_key_value_heads=settings["kv_heads"],
                         max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=settings["tied"],
                         bos_token_id=1, eos_token_id=2, rope_theta=10000.0, attn_implementation="eager")
    return LlamaForCausalLM(config)


def _setup_torch(settings: dict):
    if settings.get("device", "cpu") == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it before CUDA starts
    import torch

    if settings.get("device", "cpu") == "cuda" and not torch.cuda.is_available():
        raise TbpwError(f"training on cuda needs a CUDA build of torch and a GPU (this torch is {torch.__version__}): "
                        "use --device cpu")
    torch.manual_seed(settings["seed"])
    torch.set_num_threads(settings["threads"])
    torch.use_deterministic_algorithms(True)
    return torch


def tokens_per_second(settings: dict = SETTINGS, steps: int = 3) -> float:
    """Training throughput of this model shape on this machine now (random tokens; the first step is warm-up)."""
    torch = _setup_torch(settings)
    model = _make_model(settings)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, settings["vocab"], (settings["batch"], settings["seq"]))
    start = 0.0
    for step in range(steps + 1):
        if step == 1:
            start = time.monotonic()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch.numel() / (time.monotonic() - start)


def train(out: Path, settings: dict = SETTINGS, log: Callable[[str], None] = print) -> dict:
    """Train the model into the Hugging Face folder `out`; returns the facts for the manifest."""
    torch = _setup_torch(settings)
    evaluation_text = assets.wiki_split().evaluation.read_text(encoding="utf-8")
    sources, dropped = {}, {}
    for name, text in training_sources(settings).items():
        sources[name], dropped[name] = drop_shared_lines(text, evaluation_text)
    log("lines dropped because the evaluation text has them too: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    training_text = "\n\n".join(sources[name] for name in sorted(sources))
    checked = assert_held_out(training_text, evaluation_text)
    log(f"held-out check: none of {checked} evaluation lines is in the {len(training_text):,} training characters")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        tok_text = "\n\n".join(spread_sample(sources[name], settings["tokenizer_chars"] * len(sources[name]) // len(training_text))
                               for name in sorted(sources))
        tok_model = _train_tokenizer(tok_text, Path(tmp), settings["vocab"])
        tok_bytes = tok_model.read_bytes()
        per_source = {name: encode(tok_model, sources[name]) for name in sorted(sources)}
        eval_ids = torch.tensor(encode(tok_model, evaluation_text))
        log(f"tokenizer + encoding: {time.monotonic() - t0:.0f} s")
    train_ids = torch.tensor([i for name in sorted(per_source) for i in per_source[name]])
    seq, batch_size, steps = settings["seq"], settings["batch"], settings["steps"]
    log("tokens: " + ", ".join(f"{name} {len(ids):,}" for name, ids in per_source.items())
        + f"; evaluation (held out) {len(eval_ids):,}")

    model = _make_model(settings).to(settings.get("device", "cpu"))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params / 1e6:.2f} M")
    windows = train_ids[: len(train_ids) // seq * seq].view(-1, seq)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(settings["seed"]))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings["lr"], betas=(0.9, 0.95))
    seconds, final_loss = train_steps(model, windows, order, opt, steps=steps, batch=batch_size,
                                      warmup=settings["warmup"], log=log)
    ppl, n_windows = heldout_perplexity(model, eval_ids, seq, settings["eval_windows"])
    log(f"held-out perplexity ({n_windows} x {seq} tokens of the Wikipedia evaluation side): {ppl:.1f}")

    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out, safe_serialization=True)  # float32: the genuine trained weights
    (out / "tokenizer.model").write_bytes(tok_bytes)
    write_text(out / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048}, indent=1) + "\n")
    return {"parameters": n_params, "train_seconds": round(seconds, 1), "heldout_ppl": round(ppl, 2),
            "tokens_seen": steps * batch_size * seq, "train_tokens": len(train_ids),
            "tokens_per_source": {name: len(ids) for name, ids in per_source.items()},
            "eval_lines_checked": checked, "shared_lines_dropped": dropped, "final_loss": round(final_loss, 4)}


def bench_model(*, train_if_missing: bool = True, settings: dict = SETTINGS,
                log: Callable[[str], None] = print) -> BenchModel:
    """The cached benchmark model, trained (~15 min on 2 CPU cores) and converted on first use."""
    folder = cache_folder(settings)
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        return BenchModel(folder, folder / "hf", folder / manifest["gguf"], manifest)
    if not train_if_missing:
        raise TbpwError(f"the benchmark model is not trained yet ({folder}): run python -m testmodels.train_bench_model")
    from tbpw.llamacpp.convert import convert_hf

    def make(staging: Path) -> dict:
        facts = train(staging / "hf", settings, log)
        conversion = convert_hf(staging / "hf", staging / "bench-f16.gguf", outtype="f16",
                                log_path=staging / "convert.log")
        made = {"settings": settings, "key": settings_key(settings), "gguf": "bench-f16.gguf",
                "gguf_bytes": conversion.output.stat().st_size, **facts,
                "attribution": [assets.pinned_file("wiki").attribution,
                                "C4 and TinyStories samples from the PyPI package exllamav2 0.3.2 (MIT)",
                                GCIDE_ATTRIBUTION]}
        write_json(staging / "manifest.json", made)
        return made

    manifest = publish_folder(folder, make)
    return BenchModel(folder, folder / "hf", folder / "bench-f16.gguf", manifest)
