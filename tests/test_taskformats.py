"""llama-perplexity's task formats: exact layouts, round trips, refusals, and the real tool reading our files."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from tbpw.data import taskformats as tf
from tbpw.data.taskformats import (
    Choices,
    HellaSwagTask,
    MultipleChoiceTask,
    WinoGrandeTask,
)
from tbpw.errors import TbpwError
from tbpw.llamacpp.tools import run_tool

CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Athens", "Dublin", "Oslo", "Prague", "Warsaw", "Bern"]
COUNTRIES = ["France", "Germany", "Spain", "Italy", "Austria", "Portugal", "Greece", "Ireland", "Norway", "Czechia", "Poland", "Switzerland"]


def hellaswag_tasks() -> list[HellaSwagTask]:
    tasks = []
    for i, (_city, country) in enumerate(zip(CITIES, COUNTRIES)):
        endings = [f"{c} is a city in {country}." for c in (CITIES[(i + k) % len(CITIES)] for k in range(4))]
        gold = i % 4
        endings[0], endings[gold] = endings[gold], endings[0]
        tasks.append(HellaSwagTask(f"Geography: The capital of {country} is", tuple(endings), gold))
    return tasks


def winogrande_tasks() -> list[WinoGrandeTask]:
    """120 tasks: llama-perplexity prints its final WinoGrande score only from 100 tasks on."""
    templates = ["The capital of {}, a large city, is _ and it has many museums.", "Many people in {} visit _ every summer.",
                 "The trains from {} to _ run every hour, even at night.", "In {}, the largest city is _ by far.",
                 "{} has a famous old town, and _ is its heart.", "Tourists from {} often say _ is too crowded.",
                 "A map of {} shows _ in the middle of the country.", "Since the war, {} has rebuilt _ twice over.",
                 "The museum in {} lends paintings to _ for a year.", "Fog covers {} while _ stays sunny all day."]
    tasks = []
    for t, template in enumerate(templates):
        for i, (city, country) in enumerate(zip(CITIES, COUNTRIES)):
            other = CITIES[(i + t + 1) % len(CITIES)]
            answer = 1 + (i + t) % 2
            tasks.append(WinoGrandeTask(template.format(country), *((city, other) if answer == 1 else (other, city)), answer))
    return tasks


def mc_tasks() -> list[MultipleChoiceTask]:
    tasks = []
    for i, country in enumerate(COUNTRIES):
        answers = tuple(CITIES[(i + k) % len(CITIES)] for k in range(4))
        tasks.append(MultipleChoiceTask(f"Question: What is the capital of {country} – «{i}»?\nAnswer:",
                                        Choices(answers, (1, 0, 0, 0)),
                                        Choices(answers[:2], (1, 1)) if i % 3 == 0 else Choices()))
    return tasks


# ------------------------------------------------------------------------------------- exact layouts


def test_multiple_choice_layout_is_the_one_llama_perplexity_reads() -> None:
    task = MultipleChoiceTask("Q?", Choices(("a", "bc"), (0, 1)), Choices(("d",), (1,)))
    body = (struct.pack("<I", 2) + b"Q?" + struct.pack("<I", 2) + struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + b"bc"
            + struct.pack("<2i", 0, 1) + struct.pack("<I", 1) + struct.pack("<I", 1) + b"d" + struct.pack("<i", 1))
    # header: u32 count, then u32 offsets of each task from the start of the file
    expected = struct.pack("<II", 2, 12) + struct.pack("<I", 12 + len(body)) + body + body
    assert tf.dumps_multiple_choice([task, task]) == expected


def test_hellaswag_and_winogrande_layouts() -> None:
    text = tf.dumps_hellaswag([HellaSwagTask("Label: ctx", ("a", "b", "c", "d"), 2)])
    assert text == "Label: ctx\n2\na\nb\nc\nd\n"
    csv = tf.dumps_winogrande([WinoGrandeTask("No comma _ here.", "x", "y", 1), WinoGrandeTask("A, b _ c.", "p", "q", 2)])
    # no header (the tool would log it as a broken task); a final empty line (see dumps_winogrande)
    assert csv == '0,No comma _ here.,x,y,1\n1,"A, b _ c.",p,q,2\n\n'


# ------------------------------------------------------------------------------------------ round trips


def test_round_trips(tmp_path: Path) -> None:
    for tasks, write, read, name in ((hellaswag_tasks(), tf.write_hellaswag, tf.read_hellaswag, "h.txt"),
                                     (winogrande_tasks(), tf.write_winogrande, tf.read_winogrande, "w.csv"),
                                     (mc_tasks(), tf.write_multiple_choice, tf.read_multiple_choice, "m.bin")):
        path = write(tasks, tmp_path / name)
        assert read(path) == tasks
    assert tf.check_task_file(tmp_path / "m.bin", "multiple-choice") == len(COUNTRIES)


def test_multiple_choice_holds_up_to_100_answers() -> None:
    answers = tuple(f"answer {k}" for k in range(100))
    task = MultipleChoiceTask("many", Choices(answers, tuple(int(k == 57) for k in range(100))))
    assert tf.loads_multiple_choice(tf.dumps_multiple_choice([task])) == [task]
    with pytest.raises(TbpwError, match="at most 100"):
        tf.dumps_multiple_choice([MultipleChoiceTask("too many", Choices(answers + ("x",), (1,) * 101))])


def test_winogrande_reader_takes_a_header_and_crlf() -> None:
    text = 'index,sentence,option1,option2,answer\r\n7,"Sarah, not Maria, got _ cases.",easy,hard,1\r\n8,He _ it.,ate,saw,2\r\n\r\n'
    tasks = tf.loads_winogrande(text)
    assert tasks == [WinoGrandeTask("Sarah, not Maria, got _ cases.", "easy", "hard", 1), WinoGrandeTask("He _ it.", "ate", "saw", 2)]


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("tasks, message", [
    ([HellaSwagTask("ctx\nmore", ("a", "b", "c", "d"), 0)], "line break"),
    ([HellaSwagTask("ctx", ("a", "b", "c"), 0)], "exactly 4"),  # type: ignore[arg-type]
    ([HellaSwagTask("ctx", ("a", "b", "c", "d"), 4)], "0-3"),
    ([HellaSwagTask("ctx", ("a", "", "c", "d"), 1)], "empty field"),
])
def test_hellaswag_writer_refuses(tasks, message) -> None:
    with pytest.raises(TbpwError, match=message):
        tf.dumps_hellaswag(tasks)


@pytest.mark.parametrize("task, message", [
    (WinoGrandeTask("no blank", "a", "b", 1), "exactly one '_'"),
    (WinoGrandeTask("two _ _", "a", "b", 1), "exactly one '_'"),
    (WinoGrandeTask("a _ b", "x,y", "b", 1), "comma or quote"),
    (WinoGrandeTask('say "_" now', "a", "b", 1), "cannot read back"),
    (WinoGrandeTask("a _ b", "a", "b", 3), "1 or 2"),
])
def test_winogrande_writer_refuses(task, message) -> None:
    with pytest.raises(TbpwError, match=message):
        tf.dumps_winogrande([task])


@pytest.mark.parametrize("tasks, message", [
    ([], "at least one task"),
    ([MultipleChoiceTask("", Choices(("a",), (1,)))], "empty question"),
    ([MultipleChoiceTask("q", Choices(("a", "b"), (0, 0)))], "one labelled 1"),
    ([MultipleChoiceTask("q", Choices(("a", "b"), (1,)))], "2 answers but 1 labels"),
    ([MultipleChoiceTask("q", Choices(("a", ""), (1, 0)))], "empty answer"),
])
def test_multiple_choice_writer_refuses(tasks, message) -> None:
    with pytest.raises(TbpwError, match=message):
        tf.dumps_multiple_choice(tasks)


def test_readers_say_where_a_file_breaks() -> None:
    data = tf.dumps_multiple_choice(mc_tasks())
    with pytest.raises(TbpwError, match="truncated"):
        tf.loads_multiple_choice(data[:-3])
    with pytest.raises(TbpwError, match="bytes after its last task"):
        tf.loads_multiple_choice(data + b"\0")
    bad_offsets = data[:4] + struct.pack("<I", 999) + data[8:]
    with pytest.raises(TbpwError, match="task 0 starts at byte .* offset table says 999"):
        tf.loads_multiple_choice(bad_offsets)
    with pytest.raises(TbpwError, match="not a multiple of 6"):
        tf.loads_hellaswag("a\n0\nb\nc\nd\n")
    with pytest.raises(TbpwError, match="line 2: gold ending 'x'"):
        tf.loads_hellaswag("a\nx\nb\nc\nd\ne\n")
    for text in ("0,a _ b,x,y,1", "0,a _ b,x,y,1\n"):  # llama-perplexity reads no task from either
        with pytest.raises(TbpwError, match="drop its last task"):
            tf.loads_winogrande(text)
    with pytest.raises(TbpwError, match="line 2: answer '3'"):
        tf.loads_winogrande("index,sentence,option1,option2,answer\n0,a _ b,x,y,3\n\n")


# ---------------------------------------------------------------------------------- the real tool


def _perplexity(model: Path, args: list, log: Path) -> str:
    return run_tool("llama-perplexity", ["-m", model, "-c", 256, "-t", 2, *args], log_path=log).output


@pytest.mark.tools
def test_llama_perplexity_reads_our_hellaswag_file(tiny_model: Path, tmp_path: Path) -> None:
    path = tf.write_hellaswag(hellaswag_tasks(), tmp_path / "h.txt")
    out = _perplexity(tiny_model, ["-f", path, "--hellaswag", "--hellaswag-tasks", 8], tmp_path / "h.log")
    assert f"loaded {len(CITIES)} tasks from prompt" in out
    rows = re.findall(r"^(\d+)\t([\d.]+)\s*%?\t\[", out, re.M)
    assert rows and rows[-1][0] == "8" and 0 <= float(rows[-1][1]) <= 100


@pytest.mark.tools
def test_llama_perplexity_reads_our_winogrande_file(tiny_model: Path, tmp_path: Path) -> None:
    path = tf.write_winogrande(winogrande_tasks(), tmp_path / "w.csv")
    out = _perplexity(tiny_model, ["-f", path, "--winogrande"], tmp_path / "w.log")
    # every line read: the header is skipped, the quoted sentences with commas are parsed
    assert "loaded 120 tasks from prompt" in out
    assert "load_winogrande_from_csv" not in out  # no line refused
    assert re.search(r"Final Winogrande score\(120 tasks\): [\d.]+ \+/- [\d.]+", out)


@pytest.mark.tools
def test_llama_perplexity_reads_our_multiple_choice_file(tiny_model: Path, tmp_path: Path) -> None:
    path = tf.write_multiple_choice(mc_tasks(), tmp_path / "m.bin")
    out = _perplexity(tiny_model, ["-bf", path, "--multiple-choice"], tmp_path / "m.log")
    assert f"there are {len(COUNTRIES)} tasks in prompt" in out
    assert re.search(r"Final result: [\d.]+ \+/- [\d.]+", out)
    # a random subset makes the tool seek through the offset table
    out = _perplexity(tiny_model, ["-bf", path, "--multiple-choice", "--multiple-choice-tasks", 5], tmp_path / "m5.log")
    assert f"selecting 5 random tasks from {len(COUNTRIES)} tasks available" in out
    assert "failed to read task" not in out and re.search(r"Final result: [\d.]+", out)
