"""How much of the evaluation text the calibration text already holds: if they share passages, every number measured
on the evaluation text flatters the plans chosen on the calibration text.

Two measures, both shares of the evaluation text found in the calibration text: its sequences of `WORDS` words (the
window contamination checks of language-model papers use), estimated on the sequences whose first word's hash falls
in one `SAMPLE`th of the hash space (the same ones on both sides, so the estimate is unbiased and memory stays
small), and its
long lines (at least `LINE_CHARS` characters, whitespace and case folded), counted exactly. Hashes are CRC-32s: a
run gives the same numbers every time.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

WORDS = 13
SAMPLE = 16
LINE_CHARS = 40
WARN_SHARE = 0.05  # above this share of shared sequences a run warns: the texts are not held apart
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Overlap:
    sequences: float  # share of the evaluation text's WORDS-word sequences found in the calibration text
    lines: float  # share of its long lines found there
    sequences_checked: int  # evaluation sequences in the sample
    lines_checked: int

    @property
    def worrying(self) -> bool:
        return self.sequences > WARN_SHARE or self.lines > WARN_SHARE

    def describe(self) -> str:
        return (f"{self.sequences:.1%} of the evaluation text's {WORDS}-word sequences (a sample of "
                f"{self.sequences_checked}) and {self.lines:.1%} of its {self.lines_checked} long lines also occur in "
                "the calibration text")

    def to_json(self) -> dict:
        return {"sequences": self.sequences, "lines": self.lines, "sequences_checked": self.sequences_checked,
                "lines_checked": self.lines_checked, "words": WORDS, "warn_share": WARN_SHARE}


def _sampled_sequences(text: str) -> set[int]:
    # a word's hash decides the sample: a sequence is kept when its first word's is in the sampled part, so the
    # same sequences are kept on both sides and only they are hashed whole
    words = [w.lower() for w in _WORD.findall(text)]
    keep = [zlib.crc32(w.encode()) % SAMPLE == 0 for w in words]
    return {zlib.crc32(" ".join(words[i:i + WORDS]).encode())
            for i in range(len(words) - WORDS + 1) if keep[i]}


def _long_lines(text: str) -> set[str]:
    return {line for line in (" ".join(raw.lower().split()) for raw in text.splitlines()) if len(line) >= LINE_CHARS}


def overlap(calibration: Path | str, evaluation: Path | str) -> Overlap:
    """The share of `evaluation` that `calibration` holds (see the module doc)."""
    cal = Path(calibration).read_text(encoding="utf-8", errors="replace")
    ev = Path(evaluation).read_text(encoding="utf-8", errors="replace")
    cal_seq, ev_seq = _sampled_sequences(cal), _sampled_sequences(ev)
    cal_lines, ev_lines = _long_lines(cal), _long_lines(ev)
    return Overlap(len(ev_seq & cal_seq) / len(ev_seq) if ev_seq else 0.0,
                   len(ev_lines & cal_lines) / len(ev_lines) if ev_lines else 0.0, len(ev_seq), len(ev_lines))
