"""Regenerate tests/data/captured/: output of the real llama.cpp tools on the tiny model.

    .venv/bin/python -m tests.data.capture            # needs `tbpw build` and ../shared/fixtures/fork-tiny

The parser tests read these files, so the parsers are tested on what the tools really print. Every run
is deterministic (fixed thread count, all tasks, no sampling); absolute paths are replaced by <work>,
<fixtures> and <build> so the files do not depend on the machine. `manifest.json` records each command
and the facts the tests check the parsed results against (chunks, contexts, tasks, the type per tensor).

The task files (HellaSwag, WinoGrande, multiple choice) are built here from the Wikipedia sample: real
sentences with the true continuation among distractors. They exist to make the tools print their
result lines, not to measure anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import struct
import sys
import tempfile
from pathlib import Path

from tbpw.llamacpp.build import active_build
from tbpw.llamacpp.collector import NAME, ensure_built
from tbpw.llamacpp.tools import ToolRun, run_tool
from tbpw.model.inventory import ModelInventory

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

THREADS = "2"
CTX = 128
CHUNKS = 8
HELLASWAG_TASKS = 24
WINOGRANDE_TASKS = 110  # the tool prints its final line only from 100 tasks on
MC_TASKS = 104
# The types the tensor-type file gives each role of the tiny llama; every block weight is named.
ROLE_TYPES = {"attn_q": "q5_K", "attn_k": "q4_K", "attn_v": "q6_K", "attn_output": "iq4_xs",
              "ffn_gate": "q3_K", "ffn_up": "q4_K", "ffn_down": "q8_0"}
TOKEN_EMBD_TYPE = "q6_K"
BASE_TYPE = "Q4_K_M"


def shared_dir() -> Path:
    env = os.environ.get("TBPW_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def sentences(text: str) -> list[str]:
    found = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [s for s in found if 60 <= len(s) <= 220 and s[0].isupper() and "_" not in s and '"' not in s]


def hellaswag_file(path: Path, pool: list[str], rng: random.Random) -> None:
    lines = []
    for i in range(HELLASWAG_TASKS):
        words = pool[i].split()
        cut = len(words) // 2
        context, ending = " ".join(words[:cut]), " ".join(words[cut:])
        distractors = [" ".join(s.split()[len(s.split()) // 2:]) for s in rng.sample(pool[HELLASWAG_TASKS:], 3)]
        gold = rng.randrange(4)
        endings = distractors[:gold] + [ending] + distractors[gold:]
        lines += [f"Wikipedia: {context}", str(gold), *(f" {e}" for e in endings)]
    path.write_text("\n".join(lines) + "\n")


def winogrande_file(path: Path, pool: list[str], rng: random.Random) -> None:
    rows = ["index,sentence,option1,option2,answer"]
    used = 0
    for s in pool:
        words = s.split()
        candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 4 and i > 2]
        if not candidates:
            continue
        i = rng.choice(candidates)
        wrong = rng.choice([w for w in re.findall(r"\b[a-z]{5,}\b", " ".join(pool[:400])) if w != words[i]])
        answer = rng.choice((1, 2))
        options = (words[i], wrong) if answer == 1 else (wrong, words[i])
        sentence = " ".join(words[:i] + ["_"] + words[i + 1:]).replace(",", "")
        rows.append(f"{used},{sentence},{options[0]},{options[1]},{answer}")
        used += 1
        if used == WINOGRANDE_TASKS:
            break
    # llama.cpp drops the trailing newline of a -f file and then skips a last line that ends at EOF.
    path.write_text("\n".join(rows) + "\n\n")


def multiple_choice_file(path: Path, pool: list[str], rng: random.Random) -> None:
    def string(s: str) -> bytes:
        data = s.encode()
        return struct.pack("<I", len(data)) + data

    def answers(options: list[str], labels: list[int]) -> bytes:
        return struct.pack("<I", len(options)) + b"".join(map(string, options)) + struct.pack(f"<{len(labels)}i", *labels)

    tasks = []
    for i in range(MC_TASKS):
        words = pool[i].split()
        cut = max(3, len(words) // 2)
        question, right = " ".join(words[:cut]), " ".join(words[cut:])
        wrong = [" ".join(s.split()[len(s.split()) // 2:]) for s in rng.sample(pool[MC_TASKS:], 3)]
        gold = rng.randrange(4)
        options = wrong[:gold] + [right] + wrong[gold:]
        labels = [int(k == gold) for k in range(4)]
        tasks.append(string(question) + answers(options, labels) + answers(options, labels))
    header = 4 + 4 * len(tasks)
    offsets, pos = [], header
    for t in tasks:
        offsets.append(pos)
        pos += len(t)
    path.write_bytes(struct.pack("<I", len(tasks)) + struct.pack(f"<{len(tasks)}I", *offsets) + b"".join(tasks))


def type_file(path: Path, model: Path) -> dict[str, str]:
    """A --tensor-type-file naming every quantizable weight as an anchored, escaped pattern."""
    chosen = {}
    for t in ModelInventory.load(model).tensors:
        if not t.quantizable:
            continue
        chosen[t.name] = TOKEN_EMBD_TYPE if t.role == "token_embd" else ROLE_TYPES[t.role]
    path.write_text("\n".join(f"^{re.escape(n)}$={ty}" for n, ty in chosen.items()) + "\n")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "captured")
    args = parser.parse_args()
    fixtures = shared_dir() / "fixtures" / "fork-tiny"
    model, text = fixtures / "tiny-f16.gguf", fixtures / "wiki-sample.txt"
    build = active_build()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"build_number": build.build_number, "build_commit": build.build_commit,
                      "ctx": CTX, "chunks": CHUNKS, "threads": int(THREADS), "runs": {}}

    with tempfile.TemporaryDirectory(prefix="tbpw-capture-") as tmp:
        work = Path(tmp)
        replacements = [(str(work), "<work>"), (str(fixtures.resolve()), "<fixtures>"), (str(fixtures), "<fixtures>"),
                        (str(build.bin_dir.resolve()), "<build>"), (str(build.bin_dir), "<build>")]

        def clean(s: str) -> str:
            for old, new in replacements:
                s = s.replace(old, new)
            return s

        def capture(name: str, tool: str, argv: list, *, stdout_only: bool = False, check: bool = True,
                    suffix: str = "txt", **facts) -> ToolRun:
            run = run_tool(tool, argv, log_path=work / f"{name}.log", build=build, check=check)
            (args.out / f"{name}.{suffix}").write_text(clean(run.stdout if stdout_only else run.output), encoding="utf-8")
            manifest["runs"][name] = {"tool": tool, "args": [clean(str(a)) for a in argv],
                                      "returncode": run.returncode, **facts}
            print(f"{name}: {tool} exit {run.returncode} in {run.seconds:.1f} s", file=sys.stderr)
            return run

        imatrix = work / "imatrix.gguf"
        capture("imatrix", "llama-imatrix", ["-m", model, "-f", text, "-c", CTX, "--chunks", CHUNKS, "-t", THREADS,
                                             "-o", imatrix])
        types = type_file(work / "types.txt", model)
        quant = work / "quant.gguf"
        capture("quantize", "llama-quantize", ["--imatrix", imatrix, "--tensor-type-file", work / "types.txt",
                                               model, quant, BASE_TYPE, THREADS], types=types, base=BASE_TYPE)
        capture("quantize-dry-run", "llama-quantize", ["--dry-run", "--tensor-type-file", work / "types.txt",
                                                       model, BASE_TYPE, THREADS], types=types, base=BASE_TYPE)
        capture("perplexity", "llama-perplexity", ["-m", model, "-f", text, "-c", CTX, "--chunks", CHUNKS,
                                                   "-t", THREADS])
        base = work / "base.kld"
        capture("kld-base", "llama-perplexity", ["-m", model, "-f", text, "-c", CTX, "--chunks", CHUNKS,
                                                 "-t", THREADS, "--kl-divergence-base", base])
        capture("kld", "llama-perplexity", ["-m", quant, "-c", CTX, "-t", THREADS, "--kl-divergence-base", base,
                                            "--kl-divergence"])
        rng = random.Random(1234)
        pool = sentences(text.read_text(encoding="utf-8"))
        hellaswag_file(work / "hellaswag.txt", pool, rng)
        capture("hellaswag", "llama-perplexity", ["-m", model, "-f", work / "hellaswag.txt", "--hellaswag",
                                                  "--hellaswag-tasks", HELLASWAG_TASKS, "-c", 256, "-t", THREADS],
                tasks=HELLASWAG_TASKS)
        winogrande_file(work / "winogrande.csv", pool, rng)
        capture("winogrande", "llama-perplexity", ["-m", model, "-f", work / "winogrande.csv", "--winogrande",
                                                   "--winogrande-tasks", WINOGRANDE_TASKS, "-c", 256, "-t", THREADS],
                tasks=WINOGRANDE_TASKS)
        capture("winogrande-short", "llama-perplexity", ["-m", model, "-f", work / "winogrande.csv", "--winogrande",
                                                         "--winogrande-tasks", 20, "-c", 256, "-t", THREADS], tasks=20)
        multiple_choice_file(work / "mc.bin", pool, rng)
        capture("multiple-choice", "llama-perplexity", ["-m", model, "-bf", work / "mc.bin", "--multiple-choice",
                                                        "-c", 256, "-t", THREADS], tasks=MC_TASKS)
        capture("bench", "llama-bench", ["-m", model, "-p", 64, "-n", 16, "-r", 2, "-t", THREADS, "-o", "json"],
                stdout_only=True, suffix="json", tests=["pp64", "tg16"], repetitions=2)
        capture("bench-jsonl", "llama-bench", ["-m", model, "-p", 32, "-n", 8, "-r", 2, "-t", THREADS, "-o", "jsonl"],
                stdout_only=True, tests=["pp32", "tg8"], repetitions=2)
        # one run, two formats: the Markdown rows llama-bench prints (stdout) and their JSON (stderr)
        capture("bench-md", "llama-bench", ["-m", model, "-p", 32, "-n", 8, "-r", 2, "-t", THREADS, "-o", "md",
                                            "-oe", "json"], tests=["pp32", "tg8"], repetitions=2)
        # what tbpw runs: JSON on stdout, the --progress lines it reads as the run goes on stderr
        capture("bench-progress", "llama-bench", ["-m", model, "-p", 32, "-n", 8, "-pg", "32,8", "-r", 2, "-t", THREADS,
                                                  "-o", "json", "--progress"], tests=["pp32", "tg8", "pp32+tg8"],
                repetitions=2)
        ensure_built(build)
        capture("collector", NAME, ["-m", model, "-f", text, "-c", CTX, "--chunks", CHUNKS, "-t", THREADS,
                                    "-o", work / "collector.gguf"], chunks=CHUNKS)
        capture("version", "llama-bench", ["--version"])
        capture("devices", "llama-bench", ["--list-devices"])
        capture("quantize-help", "llama-quantize", ["--help"], check=False)
        capture("perplexity-missing-model", "llama-perplexity", ["-m", work / "missing.gguf", "-f", text],
                check=False)

    # the log of the `tbpw build` that made the active build: Ninja's step lines, which the build's progress reads
    log = build.log_path.read_text(encoding="utf-8", errors="replace")
    for old, new in ((str(build.root.parent.parent), "<cache>"), (str(Path(sys.executable).parent.parent), "<venv>")):
        log = log.replace(old, new)
    (args.out / "build.txt").write_text(log, encoding="utf-8")
    manifest["runs"]["build"] = {"tool": "cmake --build", "steps": sum(1 for line in log.splitlines() if line.startswith("["))}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(manifest['runs'])} captures to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
