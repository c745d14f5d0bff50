"""The task files llama-perplexity reads: HellaSwag text, WinoGrande CSV and the multiple-choice binary.

Writers refuse what the tool would misread (a newline inside a HellaSwag line, a comma in a WinoGrande
option, ...); readers parse a file the way the tool does and say where it breaks. Pure functions over
str/bytes (`dumps_*`, `loads_*`) plus thin atomic file wrappers (`write_*`, `read_*`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tbpw.errors import TbpwError
from tbpw.files.atomic import write_bytes, write_text

# llama-perplexity refuses a multiple-choice task with more answers than this.
MAX_ANSWERS = 100


@dataclass(frozen=True)
class HellaSwagTask:
    """`context + " " + ending` is scored for each of the four endings; `gold` is the right one (0-3)."""

    context: str
    endings: tuple[str, str, str, str]
    gold: int


@dataclass(frozen=True)
class WinoGrandeTask:
    """`sentence` holds one `_`; the tool scores the text after it with each option filled in."""

    sentence: str
    option1: str
    option2: str
    answer: int  # 1 or 2


@dataclass(frozen=True)
class Choices:
    answers: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()  # 1 marks a right answer


@dataclass(frozen=True)
class MultipleChoiceTask:
    """`question + " " + answer` is scored for each answer of `mc1` (one right answer).

    `mc2` (several right answers, as in TruthfulQA) is stored but llama-perplexity does not score it.
    """

    question: str
    mc1: Choices
    mc2: Choices = field(default_factory=Choices)


# ---------------------------------------------------------------- HellaSwag: 6 lines per task


def dumps_hellaswag(tasks: Sequence[HellaSwagTask]) -> str:
    lines: list[str] = []
    for i, task in enumerate(tasks):
        if len(task.endings) != 4:
            raise TbpwError(f"HellaSwag task {i} has {len(task.endings)} endings: the format takes exactly 4")
        if task.gold not in range(4):
            raise TbpwError(f"HellaSwag task {i} has gold ending {task.gold}: it must be 0-3")
        for part in (task.context, *task.endings):
            _one_line("HellaSwag", i, part)
        lines += [task.context, str(task.gold), *task.endings]
    return "".join(line + "\n" for line in lines)


def loads_hellaswag(text: str) -> list[HellaSwagTask]:
    lines = text.split("\n")
    if lines and lines[-1] == "":  # getline yields no line after the final newline
        lines.pop()
    if len(lines) % 6:
        raise TbpwError(f"HellaSwag file has {len(lines)} lines, not a multiple of 6 (context, gold, 4 endings per task): fix the file")
    tasks = []
    for i in range(0, len(lines), 6):
        gold = lines[i + 1].strip()
        if gold not in {"0", "1", "2", "3"}:
            raise TbpwError(f"HellaSwag line {i + 2}: gold ending {lines[i + 1]!r} is not 0-3: fix the file")
        tasks.append(HellaSwagTask(lines[i], tuple(lines[i + 2:i + 6]), int(gold)))  # type: ignore[arg-type]
    return tasks


def _one_line(fmt: str, i: int, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise TbpwError(f"{fmt} task {i} has a line break inside {value[:40]!r}: the format is one item per line")
    if not value.strip():
        raise TbpwError(f"{fmt} task {i} has an empty field: every field needs text")


# ---------------------------------------------------------------- WinoGrande CSV


def dumps_winogrande(tasks: Sequence[WinoGrandeTask]) -> str:
    """CSV rows `index,sentence,option1,option2,answer`, without a header and ending in an empty line.

    llama-perplexity would log a header line as a broken task. Its `-f` drops one final line break and
    its CSV loop then drops a last line that has none, so the file ends with two line breaks.
    """
    rows = []
    for i, task in enumerate(tasks):
        for value in (task.sentence, task.option1, task.option2):
            _one_line("WinoGrande", i, value)
        if task.sentence.count("_") != 1:
            raise TbpwError(f"WinoGrande task {i}: the sentence needs exactly one '_' (the blank), it has {task.sentence.count('_')}")
        # llama-perplexity splits on the first four unquoted commas and never unescapes quotes.
        if '"' in task.sentence:
            raise TbpwError(f"WinoGrande task {i}: the sentence contains '\"', which llama-perplexity cannot read back")
        for option in (task.option1, task.option2):
            if "," in option or '"' in option:
                raise TbpwError(f"WinoGrande task {i}: option {option!r} contains a comma or quote, which the format cannot hold")
        if task.answer not in (1, 2):
            raise TbpwError(f"WinoGrande task {i}: answer {task.answer} must be 1 or 2")
        sentence = f'"{task.sentence}"' if "," in task.sentence else task.sentence
        rows.append(f"{i},{sentence},{task.option1},{task.option2},{task.answer}")
    return "".join(row + "\n" for row in rows) + "\n"


def loads_winogrande(text: str) -> list[WinoGrandeTask]:
    """The tasks llama-perplexity reads from this file (a header line and blank lines are skipped)."""
    seen = text[:-1] if text.endswith("\n") else text  # `-f` drops one final line break
    if seen.rsplit("\n", 1)[-1].strip():  # a last line without a line break: the tool's getline drops it
        raise TbpwError("WinoGrande file does not end with an empty line: llama-perplexity would drop its last task; add a line break")
    tasks = []
    for number, raw in enumerate(seen.split("\n")[:-1], start=1):
        line = raw.rstrip("\r")
        if not line.strip() or (number == 1 and line.replace(" ", "").lower().startswith("index,sentence")):
            continue
        commas = _unquoted_commas(line, 4)
        if len(commas) != 4:
            raise TbpwError(f"WinoGrande line {number}: needs 5 comma-separated fields (index,sentence,option1,option2,answer)")
        c0, c1, c2, c3 = commas
        quoted = line[c0 + 1:c0 + 2] == '"'
        sentence = line[c0 + 2:c1 - 1] if quoted else line[c0 + 1:c1]
        answer = line[c3 + 1:].strip()
        if sentence.count("_") < 1:
            raise TbpwError(f"WinoGrande line {number}: the sentence has no '_' blank")
        if answer not in ("1", "2"):
            raise TbpwError(f"WinoGrande line {number}: answer {answer!r} must be 1 or 2")
        tasks.append(WinoGrandeTask(sentence, line[c1 + 1:c2], line[c2 + 1:c3], int(answer)))
    return tasks


def _unquoted_commas(line: str, limit: int) -> list[int]:
    found, quoted = [], False
    for pos, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            found.append(pos)
            if len(found) == limit:
                break
    return found


# ---------------------------------------------------------------- multiple-choice binary
# u32 n_tasks; u32 offset[n_tasks] (from the start of the file); per task: string question,
# then mc1 and mc2, each u32 k, k strings, i32 labels[k]. A string is u32 length + UTF-8 bytes.


def dumps_multiple_choice(tasks: Sequence[MultipleChoiceTask]) -> bytes:
    if not tasks:
        raise TbpwError("a multiple-choice file needs at least one task")
    bodies = []
    for i, task in enumerate(tasks):
        if not task.question.strip():
            raise TbpwError(f"multiple-choice task {i} has an empty question")
        if not task.mc1.answers or 1 not in task.mc1.labels:
            raise TbpwError(f"multiple-choice task {i} needs answers in mc1 with one labelled 1")
        parts = [_string(task.question)]
        for name, choices in (("mc1", task.mc1), ("mc2", task.mc2)):
            if len(choices.answers) != len(choices.labels):
                raise TbpwError(f"multiple-choice task {i} {name}: {len(choices.answers)} answers but {len(choices.labels)} labels")
            if len(choices.answers) > MAX_ANSWERS:
                raise TbpwError(f"multiple-choice task {i} {name}: {len(choices.answers)} answers, llama-perplexity reads at most {MAX_ANSWERS}")
            if any(not a for a in choices.answers):
                raise TbpwError(f"multiple-choice task {i} {name} has an empty answer")
            parts.append(struct.pack("<I", len(choices.answers)))
            parts += [_string(a) for a in choices.answers]
            parts.append(struct.pack(f"<{len(choices.labels)}i", *choices.labels))
        bodies.append(b"".join(parts))
    offset = 4 + 4 * len(tasks)
    offsets = []
    for body in bodies:
        offsets.append(offset)
        offset += len(body)
    if offset >= 1 << 32:
        raise TbpwError("multiple-choice file would exceed 4 GiB, beyond its 32-bit offsets: use fewer tasks")
    return struct.pack(f"<I{len(tasks)}I", len(tasks), *offsets) + b"".join(bodies)


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<I", len(data)) + data


def loads_multiple_choice(data: bytes) -> list[MultipleChoiceTask]:
    reader = _Reader(data)
    n = reader.u32("task count")
    if n == 0:
        raise TbpwError("multiple-choice file has no tasks")
    offsets = [reader.u32("task offsets") for _ in range(n)]
    tasks = []
    for i in range(n):
        if reader.pos != offsets[i]:
            raise TbpwError(f"multiple-choice task {i} starts at byte {reader.pos} but the offset table says {offsets[i]}: the file is corrupt")
        question = reader.string(f"task {i} question")
        mc = []
        for name in ("mc1", "mc2"):
            k = reader.u32(f"task {i} {name} size")
            if k > MAX_ANSWERS:
                raise TbpwError(f"multiple-choice task {i} {name} claims {k} answers (at most {MAX_ANSWERS}): the file is corrupt")
            answers = tuple(reader.string(f"task {i} {name} answer") for _ in range(k))
            labels = tuple(reader.i32(f"task {i} {name} label") for _ in range(k))
            mc.append(Choices(answers, labels))
        tasks.append(MultipleChoiceTask(question, mc[0], mc[1]))
    if reader.pos != len(data):
        raise TbpwError(f"multiple-choice file has {len(data) - reader.pos} bytes after its last task: the file is corrupt")
    return tasks


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def _take(self, size: int, what: str) -> bytes:
        if self.pos + size > len(self.data):
            raise TbpwError(f"multiple-choice file ends inside {what} (byte {self.pos}): the file is truncated")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self._take(4, what))[0]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self._take(4, what))[0]

    def string(self, what: str) -> str:
        raw = self._take(self.u32(what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TbpwError(f"multiple-choice file: {what} at byte {self.pos - len(raw)} is not UTF-8") from None


# ---------------------------------------------------------------- files


def write_hellaswag(tasks: Sequence[HellaSwagTask], path: Path) -> Path:
    write_text(path, dumps_hellaswag(tasks))
    return path


def read_hellaswag(path: Path) -> list[HellaSwagTask]:
    return loads_hellaswag(Path(path).read_text(encoding="utf-8"))


def write_winogrande(tasks: Sequence[WinoGrandeTask], path: Path) -> Path:
    write_text(path, dumps_winogrande(tasks))
    return path


def read_winogrande(path: Path) -> list[WinoGrandeTask]:
    return loads_winogrande(Path(path).read_text(encoding="utf-8"))


def write_multiple_choice(tasks: Sequence[MultipleChoiceTask], path: Path) -> Path:
    write_bytes(path, dumps_multiple_choice(tasks))
    return path


def read_multiple_choice(path: Path) -> list[MultipleChoiceTask]:
    return loads_multiple_choice(Path(path).read_bytes())


READERS: dict[str, Callable[[Path], Sequence[object]]] = {"hellaswag": read_hellaswag, "winogrande": read_winogrande, "multiple-choice": read_multiple_choice}


def check_task_file(path: Path, kind: str) -> int:
    """Parse a task file of `kind` as llama-perplexity would; returns its number of tasks."""
    if kind not in READERS:
        raise TbpwError(f"unknown task file kind {kind!r}: use one of {', '.join(READERS)}")
    return len(READERS[kind](path))
