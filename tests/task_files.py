"""Task benchmark files written for tests from the Wikipedia sample (real sentences, known answers)."""

from __future__ import annotations

import re
from pathlib import Path

from tbpw.data.taskformats import HellaSwagTask, write_hellaswag


def hellaswag_from(text: Path, out: Path, n: int = 12) -> Path:
    """Real sentences of the text with the true continuation among three others."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.read_text(encoding="utf-8").split()))
                 if 60 <= len(s) <= 200]
    tasks = []
    for i in range(n):
        first, second = sentences[2 * i], sentences[2 * i + 1]
        wrong = [sentences[(2 * i + 7 * k + 40) % len(sentences)] for k in (1, 2, 3)]
        gold = i % 4
        endings = wrong[:gold] + [second] + wrong[gold:]
        tasks.append(HellaSwagTask(first, tuple(" " + e for e in endings), gold))
    return write_hellaswag(tasks, out)
