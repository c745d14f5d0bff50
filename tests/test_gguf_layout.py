"""The fast GGUF layout reader agrees with gguf's GGUFReader, and opens big vocabularies at once."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from tbpw.errors import TbpwError
from tbpw.model import gguf_layout
from tbpw.model.inventory import ModelInventory
from testmodels.gguf_writers import write_large_vocabulary


def _same_as_reader(path) -> None:
    ours, ref = gguf_layout.read(path), GGUFReader(path)
    assert (ours.data_offset, ours.alignment) == (ref.data_offset, ref.alignment)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.shape == tuple(int(x) for x in b.shape) and a.tensor_type == b.tensor_type
        assert (a.data_offset, a.n_bytes) == (int(b.data_offset), int(b.n_bytes))
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes()  # bytes: the stats hold NaN


def test_layout_of_the_tiny_model_and_imatrix(tiny_model, fork_imatrix):
    _same_as_reader(tiny_model)
    _same_as_reader(fork_imatrix)
    assert gguf_layout.read(tiny_model).architecture == "llama"
    assert gguf_layout.read(tiny_model).fields["llama.block_count"] == 4


def test_layout_of_quantized_and_odd_tensors(tmp_path):
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    w.add_custom_alignment(64)
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_tensor("a.weight", rng.standard_normal((3, 64)).astype(np.float32))
    q = quantize(rng.standard_normal((4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("b.weight", q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", rng.standard_normal((2, 3, 32)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same_as_reader(tmp_path / "mixed.gguf")
    layout = gguf_layout.read(tmp_path / "mixed.gguf")
    assert layout.alignment == 64 and layout.fields["tokenizer.ggml.tokens"] == ("array", 8, 3)
    inv = ModelInventory.load(tmp_path / "mixed.gguf")
    assert inv.rows("b.weight").shape == (4, 64) and inv.rows("c.weight", expert=1).shape == (3, 32)


def test_a_large_vocabulary_opens_without_gguf_reader(tmp_path, monkeypatch):
    """GGUFReader makes a numpy view per vocabulary entry (20-60 s here): the inventory steps over metadata
    arrays instead. Proved by taking GGUFReader away; how fast it is, is a benchmark (benchmarks/speed.py)."""
    write_large_vocabulary(tmp_path / "vocab.gguf")
    import gguf
    import gguf.gguf_reader

    def refused(*args, **kwargs):
        raise AssertionError("GGUFReader was used")

    monkeypatch.setattr(gguf, "GGUFReader", refused)
    monkeypatch.setattr(gguf.gguf_reader, "GGUFReader", refused)
    inv = ModelInventory.load(tmp_path / "vocab.gguf")
    assert inv["blk.0.attn_q.weight"].shape == (32, 32)


def test_damaged_files_are_user_errors(tmp_path, tiny_model):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[:200_000])
    with pytest.raises(TbpwError, match="damaged|truncated"):
        gguf_layout.read(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(TbpwError, match="not a GGUF file"):
        ModelInventory.load(junk)


def _resident_kib(path) -> int:
    """This process's resident KiB of its mappings of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps", encoding="utf-8", errors="replace"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = line.rstrip("\n").endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="madvise(MADV_DONTNEED) is Linux's")
def test_release_gives_back_the_pages_a_read_mapped(tiny_model):
    """Reading a model tensor by tensor must not leave the whole model resident: `release` drops what a read mapped."""
    inventory = ModelInventory.load(tiny_model)
    name = max(inventory.tensors, key=lambda t: t.stored_bytes).name
    before = _resident_kib(tiny_model)
    inventory.rows(name)
    read = _resident_kib(tiny_model)
    assert (read - before) * 1024 >= 0.9 * inventory[name].stored_bytes
    inventory.release(name)
    # at most the two pages it shares with its neighbours, and what the kernel's fault-around mapped beside the
    # tensor's first pages (up to 64 KiB: the header's pages, untouched when the header was parsed before)
    assert _resident_kib(tiny_model) <= before + 8 + 64
