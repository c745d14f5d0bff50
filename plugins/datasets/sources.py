"""Dataset sources: a local file, a URL, a pinned registry package, the Hugging Face hub (and its presets), a mix.

Text datasets share the transforms of `TextTransforms`; task files are checked in their llama-perplexity format.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator

from tbpw import (
    Dataset,
    DatasetContext,
    DatasetFile,
    DatasetKind,
    PinnedArchive,
    PluginOptions,
    TbpwError,
    atomic_path,
    check_task_file,
    content_sha256,
    extract_member,
    fetch_pinned,
    sha256_file,
    write_text,
)

TOKEN_BYTES = 4  # UTF-8 bytes per token, a typical English BPE average: take_tokens is approximate


Format = Literal["auto", "text", "jsonl", "parquet"]


Split = Literal["all", "calibration", "evaluation"]


SHA256 = r"^[0-9a-f]{64}$"


def _number_as_text(value: Any) -> Any:
    # `-o version=2` and a recipe's `version: 2` are read as YAML, which makes a number of them; the registry wants
    # its text (a version with a trailing zero, 1.10, still needs quotes: as a number it is 1.1)
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


Text = Annotated[str, BeforeValidator(_number_as_text)]  # a version, revision or seed, given as text or a number


class TextTransforms(PluginOptions):
    split: Split = Field("all", description="keep all documents, or one side of a disjoint calibration/evaluation split by document")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="share of documents on the evaluation side of `split`")
    split_seed: Text = Field("tbpw", description="seed of the split: documents land on a side by a hash of seed and content")
    take_articles: int | None = Field(None, ge=1, description="keep the first N documents (after the split)")
    take_tokens: int | None = Field(None, ge=1, description=f"keep about N tokens (estimated as {TOKEN_BYTES} UTF-8 bytes per token), cutting at a word boundary")


class SourceOptions(TextTransforms):
    kind: DatasetKind = Field("text", description="text, or the llama-perplexity task format the file is in")
    format: Format = Field("auto", description="how to read a text source: by file suffix (auto), text, jsonl or parquet")
    field: str | None = Field(None, description="JSONL key or parquet column holding the text (default: `text`, or the only column)")
    article_start: str | None = Field(None, description="regex: a line matching it starts a new document")

    @field_validator("article_start")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


def read_records(path: Path, fmt: Format, field: str | None) -> tuple[list[str], bool]:
    """The text of a source as records, and whether each record is a row (vs the whole file)."""
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = "jsonl" if suffix in (".jsonl", ".json", ".ndjson") else "parquet" if suffix == ".parquet" else "text"
    if fmt == "text":
        return [_utf8(path, "give format 'jsonl' or 'parquet', or convert it to UTF-8")], False
    if fmt == "jsonl":
        return _jsonl_rows(path, field or "text"), True
    return _parquet_rows(path, field), True


def _utf8(path: Path, fix: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TbpwError(f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): {fix}") from None
    except OSError as exc:
        raise TbpwError(f"cannot read {path} ({exc.strerror or exc}): check the file and its permissions") from None


def _jsonl_rows(path: Path, field: str) -> list[str]:
    rows = []
    for number, line in enumerate(_utf8(path, "save it as UTF-8 JSON lines").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TbpwError(f"{path} line {number} is not JSON ({exc.msg}): give one JSON object per line") from None
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise TbpwError(f"{path} line {number} has no field {field!r} (it has: {keys}): set the `field` option")
        rows.append(str(record[field]))
    return rows


def _parquet_rows(path: Path, field: str | None) -> list[str]:
    try:
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise TbpwError(f"reading the parquet file {path} needs pyarrow: pip install pyarrow") from None
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise TbpwError(f"{path} is not a readable parquet file ({exc}): check the file") from None
    columns = list(schema.names)
    column = field or ("text" if "text" in columns else columns[0] if len(columns) == 1 else None)
    if column is None or column not in columns:
        raise TbpwError(f"{path} has no column {column or 'text'!r} (it has: {', '.join(columns)}): set the `field` option")
    return ["" if v is None else str(v) for v in pq.read_table(path, columns=[column]).column(column).to_pylist()]


def to_documents(records: list[str], rows: bool, article_start: str | None) -> list[str]:
    """Documents, each ending with its own separator, so that joining them gives the text back."""
    if article_start is not None:
        text = "".join(r if r.endswith("\n") else r + "\n" for r in records) if rows else records[0]
        starts = [m.start() for m in re.finditer(article_start, text, re.M)]
        cuts = sorted({0, *starts, len(text)})
        return [text[a:b] for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]
    if rows:
        return [r if r.endswith("\n") else r + "\n" for r in records if r.strip()]
    return [block.strip("\n") + "\n\n" for block in re.split(r"\n[ \t]*\n", records[0]) if block.strip()]


def split_documents(docs: list[str], side: Split, fraction: float, seed: str) -> list[str]:
    """One side of a split by document; identical documents always land on the same side."""
    if side == "all":
        return docs

    def on_eval_side(doc: str) -> bool:
        digest = hashlib.sha256(f"{seed}\0{doc.strip()}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < fraction

    return [d for d in docs if on_eval_side(d) == (side == "evaluation")]


def take(docs: list[str], articles: int | None, tokens: int | None) -> list[str]:
    if articles is not None:
        docs = docs[:articles]
    if tokens is not None:
        budget, kept = tokens * TOKEN_BYTES, []
        for doc in docs:
            size = len(doc.encode("utf-8"))
            if size <= budget:
                kept.append(doc)
                budget -= size
                continue
            cut = doc.encode("utf-8")[:budget].decode("utf-8", "ignore")
            cut = cut[:cut.rfind(" ")] if " " in cut else cut
            if cut.strip():
                # keep the document's own separator, so that it stays apart from whatever follows it
                kept.append(cut.rstrip() + (doc[len(doc.rstrip("\n")):] or "\n"))
            break
        docs = kept
    return docs


def transform(docs: list[str], options: TextTransforms) -> list[str]:
    docs = split_documents(docs, options.split, options.eval_fraction, options.split_seed)
    docs = take(docs, options.take_articles, options.take_tokens)
    if not docs:
        raise TbpwError("the dataset is empty after its transforms (split/take_*): loosen them or check the source")
    return docs


def output_path(context: DatasetContext, name: str, options: Any, identity: str, suffix: str = ".txt") -> Path:
    """A cache file named by everything that determines its content."""
    payload = json.dumps({"dataset": name, "options": options.model_dump(mode="json"), "source": identity}, sort_keys=True)
    return context.cache_dir / f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}{suffix}"


def write_documents(docs: list[str], path: Path) -> Path:
    if not path.is_file():
        write_text(path, "".join(docs))
    return path


class Source(Dataset):
    """Shared by the sources: fetch a file, then either check a task file or build text from it."""

    name: ClassVar[str]
    options: SourceOptions

    def fetch(self, context: DatasetContext) -> tuple[Path, str]:
        """The source file and a key of its content."""
        raise NotImplementedError

    def kind(self) -> DatasetKind:
        return self.options.kind

    def describe(self) -> tuple[str, str]:
        """(description, attribution) for reports."""
        return self.name, ""

    def documents(self, context: DatasetContext) -> list[str]:
        if self.options.kind != "text":
            raise TbpwError(f"dataset {self.name!r} holds a {self.options.kind} task file, not text: it cannot be split or mixed")
        return self._documents_of(self.fetch(context)[0])

    def _documents_of(self, path: Path) -> list[str]:
        records, rows = read_records(path, self.options.format, self.options.field)
        return transform(to_documents(records, rows, self.options.article_start), self.options)

    def materialize(self, context: DatasetContext) -> DatasetFile:
        description, attribution = self.describe()
        if self.options.kind != "text":
            self._refuse_text_options()
            path, _ = self.fetch(context)
            count = check_task_file(path, self.options.kind)
            return DatasetFile(path, self.options.kind, f"{description} ({count} tasks)", attribution)
        path, identity = self.fetch(context)
        target = output_path(context, self.name, self.options, identity)
        if not target.is_file():
            write_documents(self._documents_of(path), target)
        return DatasetFile(target, "text", description, attribution)

    def _refuse_text_options(self) -> None:
        defaults = SourceOptions()
        for key in ("split", "take_articles", "take_tokens", "article_start", "field"):
            if getattr(self.options, key) != getattr(defaults, key):
                raise TbpwError(f"dataset {self.name!r}: option {key!r} applies to text, not to a {self.options.kind} task file: remove it")


class FileDataset(Source):
    name = "file"
    description = "a local text, JSONL or parquet file, or a llama-perplexity task file"

    class Options(SourceOptions):
        path: Path = Field(description="the file")

    options: Options

    def fetch(self, context: DatasetContext) -> tuple[Path, str]:
        path = self._checked_path()
        return path, content_sha256(path)

    def _checked_path(self) -> Path:
        path = self.options.path.expanduser()
        if path.is_dir():
            raise TbpwError(f"dataset file {path} is a folder: give a file in the `path` option")
        if not path.is_file():
            raise TbpwError(f"dataset file {path} does not exist: fix the `path` option")
        if not os.access(path, os.R_OK):
            raise TbpwError(f"dataset file {path} is not readable: fix its permissions or the `path` option")
        return path

    def check_ready(self) -> None:
        """The file is there, readable and of its kind (a task file parses; text decodes and survives the transforms)."""
        path = self._checked_path()
        if self.options.kind != "text":
            self._refuse_text_options()
            check_task_file(path, self.options.kind)
        else:
            self._documents_of(path)

    def describe(self) -> tuple[str, str]:
        return f"local file {Path(self.options.path).name}", ""  # the folder is the user's own: not for reports


class UrlDataset(Source):
    name = "url"
    description = "an HTTP(S) download, verified by its sha256"

    class Options(SourceOptions):
        url: str = Field(pattern=r"^https?://", description="http:// or https:// address")
        sha256: str = Field(pattern=SHA256, description="sha256 of the file (required: downloads are verified)")
        filename: str | None = Field(None, pattern=r"^[^/\\]+$", description="name to store it under (default: the last part of the address)")
        timeout: float = Field(60.0, gt=0, description="seconds to wait for the server")

    options: Options

    def fetch(self, context: DatasetContext) -> tuple[Path, str]:
        opts = self.options
        name = opts.filename or opts.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if not name or name in (".", ".."):
            name = "download"
        target = context.cache_dir / "url" / opts.sha256[:16] / name
        if target.is_file():
            if sha256_file(target) == opts.sha256:
                return target, opts.sha256
            target.unlink()
        if context.offline:
            raise TbpwError(f"{opts.url} is not in the cache and tbpw runs offline: download it to {target} (sha256 {opts.sha256})")
        with atomic_path(target) as tmp:
            try:
                with urllib.request.urlopen(opts.url, timeout=opts.timeout) as response, open(tmp, "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
            except (urllib.error.URLError, OSError) as exc:
                reason = f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
                raise TbpwError(f"could not download {opts.url} ({reason}): check the address and the network, or place the file at {target}") from None
            actual = sha256_file(tmp)
            if actual != opts.sha256:
                raise TbpwError(f"{opts.url} has sha256 {actual}, not the {opts.sha256} the dataset options pin: fix the `sha256` option if the file changed on purpose")
        return target, opts.sha256

    def describe(self) -> tuple[str, str]:
        return f"download {self.options.url}", ""


class PackageDataset(Source):
    name = "package"
    description = "a file inside a registry package pinned by version and sha256 (downloaded with pip, never installed)"

    class Options(SourceOptions):
        package: str = Field(pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$",
                             description="the package's registry name, e.g. exllamav2")
        version: Text = Field(pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9.+!_-]*[A-Za-z0-9])?$",
                              description="its exact version, e.g. 0.3.2 (quote one such as '1.10')")
        sha256: str = Field(pattern=SHA256, description="sha256 of the archive (wheel or sdist)")
        archive: Literal["wheel", "sdist"] = Field("wheel", description="which archive of that version")
        path: str = Field(description="the file's path inside the archive (relative, no '..')")

        @field_validator("path")
        @classmethod
        def _inside(cls, value: str) -> str:
            if value.startswith("/") or ".." in value.split("/"):
                raise ValueError("must be a relative path inside the archive, without '..'")
            return value

    options: Options

    def _pin(self) -> PinnedArchive:
        o = self.options
        return PinnedArchive(name=o.package, version=o.version, sha256=o.sha256, archive=o.archive,
                                      pinned_in="the dataset options")

    def fetch(self, context: DatasetContext) -> tuple[Path, str]:
        o = self.options
        target = context.cache_dir / "package" / o.sha256[:16] / o.path
        if not target.is_file():
            extract_member(fetch_pinned(self._pin(), offline=context.offline), o.path, target)
        return target, f"{o.sha256}:{o.path}"

    def describe(self) -> tuple[str, str]:
        o = self.options
        return f"{o.path} from {o.package}=={o.version}", ""


class HubDataset(Source):
    name = "hub"
    description = "a Hugging Face dataset file or config/split, through huggingface_hub (cached in Hugging Face's cache)"

    class Options(SourceOptions):
        repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="dataset repository, owner/name")
        revision: Text = Field("main", description="branch, tag or (best) commit to pin")
        file: str | None = Field(None, description="a file of the repository; else give config and split")
        config: str | None = Field(None, description="dataset config (subset), with split, when no file is given")
        hub_split: str | None = Field(None, description="the dataset's own split (train/validation/test), with config")

    options: Options
    attribution: ClassVar[str] = ""

    def _hub(self):
        try:
            return importlib.import_module("huggingface_hub")
        except ImportError:
            raise TbpwError(f"dataset {self.name!r} needs huggingface_hub: pip install 'tbpw[hub]'") from None

    def check_ready(self) -> None:
        self._hub()

    def fetch(self, context: DatasetContext) -> tuple[Path, str]:
        o = self.options
        hub = self._hub()
        files = [o.file] if o.file else self._split_files(hub, context)
        paths = [self._download(hub, f, context) for f in files]
        # Keyed by content: a branch such as `main` moves, and what it gives then is another dataset.
        contents = [content_sha256(p) for p in paths]
        if len(paths) == 1:
            return paths[0], contents[0]
        # A split stored in shards: their rows, concatenated, in one parquet-free text cache file.
        merged = context.cache_dir / "hub" / f"{hashlib.sha256(json.dumps(contents).encode()).hexdigest()[:16]}.jsonl"
        if not merged.is_file():
            rows = [r for p in paths for r in read_records(p, "parquet", o.field)[0]]
            write_text(merged, "".join(json.dumps({"text": r}) + "\n" for r in rows))
        # From here on the source is that JSONL file, whatever format the shards had.
        self.options = o.model_copy(update={"format": "jsonl", "field": "text"})
        return merged, hashlib.sha256(json.dumps(contents).encode()).hexdigest()

    def _split_files(self, hub, context: DatasetContext) -> list[str]:
        o = self.options
        if not (o.config and o.hub_split):
            raise TbpwError(f"dataset {self.name!r} needs `file`, or both `config` and `hub_split`")
        if context.offline:
            raise TbpwError(f"listing the files of {o.repo} needs the network and tbpw runs offline: give the `file` option")
        for revision in (o.revision, "refs/convert/parquet"):
            try:
                names = hub.HfApi().list_repo_files(o.repo, repo_type="dataset", revision=revision)
            except Exception as exc:  # huggingface_hub raises many kinds; all mean "could not list"
                raise TbpwError(f"could not list the files of the hub dataset {o.repo}@{revision} ({type(exc).__name__}): "
                                "check the network and the names, or give the `file` option") from None
            pattern = re.compile(rf"^{re.escape(o.config)}/(?:{re.escape(o.hub_split)}[-/.]).*\.parquet$")
            chosen = sorted(n for n in names if pattern.match(n))
            if chosen:
                return chosen
        raise TbpwError(f"the hub dataset {o.repo} has no parquet files for config {o.config!r} split {o.hub_split!r}: check the names or give `file`")

    def _download(self, hub, filename: str, context: DatasetContext) -> Path:
        o = self.options
        try:
            return Path(hub.hf_hub_download(o.repo, filename, repo_type="dataset", revision=o.revision,
                                            local_files_only=context.offline))
        except Exception as exc:
            constants = importlib.import_module("huggingface_hub.constants")
            not_cached = importlib.import_module("huggingface_hub.errors").LocalEntryNotFoundError
            cache = Path(constants.HF_HUB_CACHE) / f"datasets--{o.repo.replace('/', '--')}"
            if isinstance(exc, (not_cached, OSError)):
                raise TbpwError(f"{filename} of the hub dataset {o.repo}@{o.revision} is not in the cache and the hub cannot be reached: "
                                f"connect to the network, or fill {cache} (run `hf download {o.repo} {filename} --repo-type dataset "
                                f"--revision {o.revision}` where the hub is reachable and copy that folder)") from None
            raise TbpwError(f"could not fetch {filename} from the hub dataset {o.repo}@{o.revision} ({type(exc).__name__}: {exc}): "
                            "check the repository, revision and file names") from None

    def describe(self) -> tuple[str, str]:
        o = self.options
        what = o.file or f"{o.config}/{o.hub_split}"
        return f"{o.repo}@{o.revision} {what} (Hugging Face hub)", self.attribution


def _hub_preset(preset: str, doc: str, repo: str, file: str, kind: DatasetKind = "text", *,
                attribution: str, field: str | None = None, article_start: str | None = None) -> type[HubDataset]:
    """A `hub` dataset with repository and file filled in; options keep revision (and transforms for text)."""
    base = TextTransforms if kind == "text" else PluginOptions

    class Options(base):  # type: ignore[valid-type, misc]
        revision: Text = Field("main", description="branch, tag or (best) commit of the repository to pin")

    class Preset(HubDataset):
        name = preset
        description = doc

        def __init__(self, options: Any) -> None:
            fields = options.model_dump()
            HubDataset.__init__(self, HubDataset.Options(repo=repo, file=file, kind=kind, field=field,
                                                         article_start=article_start, **fields))

    Preset.Options = Options  # type: ignore[misc]
    Preset.attribution = attribution
    Preset.__name__ = Preset.__qualname__ = "Hub_" + re.sub(r"\W", "_", preset)
    return Preset


IKAWRAKOW = "ikawrakow/validation-datasets-for-llama.cpp"


HUB_PRESETS = [
    _hub_preset("wikitext-2", "WikiText-2 raw, test split (Salesforce/wikitext wikitext-2-raw-v1), the usual perplexity text",
                "Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet", field="text",
                article_start=r"^ = [^=].* = $",
                attribution="WikiText-2 (Merity et al., 2016) from English Wikipedia, CC BY-SA 3.0 / GFDL; see the Salesforce/wikitext dataset card"),
    _hub_preset("arc-challenge", "ARC-Challenge validation questions for llama-perplexity --multiple-choice (ikawrakow's file)",
                IKAWRAKOW, "arc-challenge-validation.bin", "multiple-choice",
                attribution=f"ARC (Clark et al., 2018, Allen Institute for AI), CC BY-SA 4.0; converted in {IKAWRAKOW}"),
    _hub_preset("arc-easy", "ARC-Easy validation questions for llama-perplexity --multiple-choice (ikawrakow's file)",
                IKAWRAKOW, "arc-easy-validation.bin", "multiple-choice",
                attribution=f"ARC (Clark et al., 2018, Allen Institute for AI), CC BY-SA 4.0; converted in {IKAWRAKOW}"),
    _hub_preset("mmlu", "MMLU validation questions for llama-perplexity --multiple-choice (ikawrakow's file)",
                IKAWRAKOW, "mmlu-validation.bin", "multiple-choice",
                attribution=f"MMLU (Hendrycks et al., 2021), MIT licence; converted in {IKAWRAKOW}"),
    _hub_preset("truthfulqa", "TruthfulQA validation questions for llama-perplexity --multiple-choice (ikawrakow's file)",
                IKAWRAKOW, "truthful-qa-validation.bin", "multiple-choice",
                attribution=f"TruthfulQA (Lin et al., 2021), Apache-2.0; converted in {IKAWRAKOW}"),
    _hub_preset("hellaswag", "HellaSwag validation set for llama-perplexity --hellaswag (ikawrakow's file)",
                IKAWRAKOW, "hellaswag_val_full.txt", "hellaswag",
                attribution=f"HellaSwag (Zellers et al., 2019), MIT licence; converted in {IKAWRAKOW}"),
    _hub_preset("winogrande", "WinoGrande debiased evaluation set for llama-perplexity --winogrande (ikawrakow's file)",
                "ikawrakow/winogrande-eval-for-llama.cpp", "winogrande-debiased-eval.csv", "winogrande",
                attribution="WinoGrande (Sakaguchi et al., 2019, Allen Institute for AI), CC-BY; converted in ikawrakow/winogrande-eval-for-llama.cpp"),
]


class ImatrixCalibration(HubDataset):
    name = "imatrix-calibration"
    description = "Ed Addario's imatrix calibration sets (eaddario/imatrix-calibration): <subset>_<size>.parquet"
    attribution = "eaddario/imatrix-calibration (Ed Addario), MIT; see its dataset card for the sources of each subset"

    class Options(TextTransforms):
        subset: str = Field("combined_all", pattern=r"^[a-z_]+$", description="e.g. combined_all, text_en, code, math, tools")
        size: Literal["micro", "tiny", "small", "medium", "large", "huge"] = Field("small", description="file size")
        revision: Text = Field("main", description="branch, tag or (best) commit of the repository to pin")

    def __init__(self, options: Any):
        fields = options.model_dump()
        file = f"{fields.pop('subset')}_{fields.pop('size')}.parquet"
        super().__init__(HubDataset.Options(repo="eaddario/imatrix-calibration", file=file, **fields))


class MixPart(PluginOptions):
    dataset: str = Field(description="a text dataset's name")
    options: dict[str, Any] = Field(default_factory=dict, description="that dataset's options")
    weight: float = Field(1.0, gt=0, description="its share of `take_tokens` (relative to the other parts)")


class Mix(Dataset):
    name = "mix"
    description = "several text datasets combined: each part's documents, weighted by tokens, optionally interleaved"

    class Options(PluginOptions):
        parts: list[MixPart] = Field(min_length=1, description="the datasets to combine")
        take_tokens: int | None = Field(None, ge=1, description="about N tokens in all, shared by weight (default: every part whole)")
        interleave: bool = Field(True, description="shuffle the documents of all parts together (seeded) instead of concatenating")
        seed: Text = Field("tbpw-mix", description="seed of the interleaving")

    options: Options

    def documents(self, context: DatasetContext) -> list[str]:
        import random

        total = sum(p.weight for p in self.options.parts)
        docs: list[str] = []
        for part in self.options.parts:
            dataset = context.dataset(part.dataset, part.options)
            if hasattr(dataset, "documents"):
                part_docs = dataset.documents(context)
            else:
                produced = dataset.materialize(context)
                if produced.kind != "text":
                    raise TbpwError(f"mix part {part.dataset!r} is a {produced.kind} task file: only text datasets mix")
                part_docs = to_documents([produced.path.read_text(encoding="utf-8")], False, None)
            if self.options.take_tokens is not None:
                part_docs = take(part_docs, None, max(1, round(self.options.take_tokens * part.weight / total)))
            docs += part_docs
        if self.options.interleave:
            random.Random(self.options.seed).shuffle(docs)
        return docs

    def kind(self) -> DatasetKind:
        return "text"

    def materialize(self, context: DatasetContext) -> DatasetFile:
        docs = self.documents(context)
        key = hashlib.sha256("".join(docs).encode()).hexdigest()
        target = output_path(context, self.name, self.options, key)
        names = ", ".join(p.dataset for p in self.options.parts)
        return DatasetFile(write_documents(docs, target), "text", f"mixture of {names}")

