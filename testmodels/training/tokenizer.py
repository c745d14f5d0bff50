"""The SentencePiece recipe every model tbpw trains for itself uses (test models, the benchmark model).

BPE with byte fallback and split digits (what llama.cpp's converter handles without a pre-tokenizer
hash), trained on all sentences in file order with one thread, so every machine gets the same vocabulary.
"""

from __future__ import annotations

from pathlib import Path


def train_tokenizer(text_file: Path, out_dir: Path, vocab: int) -> Path:
    """Train on `text_file`; returns the path of `tokenizer.model` in `out_dir`."""
    import sentencepiece as spm

    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab,
        byte_fallback=True, split_digits=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    model = prefix.with_suffix(".model")
    _forget_paths(model)
    return model


def _forget_paths(model: Path) -> None:
    """Drop the training file and output paths the trainer records, so the same text gives the same bytes."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.trainer_spec.ClearField("input")
    proto.trainer_spec.ClearField("model_prefix")
    model.write_bytes(proto.SerializeToString())


def encode(tokenizer_model: Path, text: str) -> list[int]:
    """Token ids of `text`, each blank-line-separated document starting with BOS."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    ids: list[int] = []
    for doc in text.split("\n\n"):
        if doc.strip():
            ids += [sp.bos_id(), *sp.encode(doc)]
    return ids
