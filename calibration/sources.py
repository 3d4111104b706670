"""Calibration, evaluation and training text: a named source or any dataset streamed through `datasets`
(from the Hugging Face hub or a local directory), or a local file."""

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub

from cmoe.errors import HUB_ERRORS, CmoeError

from .formats import Reader, json_document, json_lines, parquet_column, plain_text, first_line, read_documents

SPLITS = ("train", "validation", "test")
LOCAL_READERS: Mapping[str, Reader] = {".jsonl": json_lines, ".json": json_document, ".parquet": parquet_column("text")}
LOCAL_SEPARATOR = "\n\n"
OFFLINE_HINT = "pass a local file instead, e.g. --data path/to/text.txt"


@dataclass(frozen=True)
class LoadedText:
    """The text, and a JSON-serialisable description of exactly what was loaded (recorded in recipes)."""

    text: str
    description: dict


@dataclass(frozen=True)
class TextSource:
    """Text opened for reading: its documents streamed in order, the separator that joins them, what
    describes it in a recipe, and whether commands read it whole (local files and the named protocols) or
    only the tokens they need (hub datasets, which may hold billions)."""

    name: str
    documents: Callable[[], Iterable[str]]
    separator: str
    description: dict
    read_whole: bool = True
    max_documents: int | None = None
    default_max_windows: int | None = None


@dataclass(frozen=True)
class HubSource:
    """A named text on the hub: which file holds each split, the column of its documents, how GPTQ joins them."""

    repo_id: str
    files: Mapping[str, str]
    column: str
    separator: str
    revision: str | None = None
    max_documents: int | None = None
    default_max_windows: int | None = None

    def open(self, name: str, split: str, commit: str | None = None) -> TextSource:
        """The split streamed through `datasets` at `commit` (default: the revision's commit now), the
        first `max_documents` only."""
        if split not in self.files:
            raise CmoeError(f"{name}: unknown split {split!r}, expected one of {', '.join(self.files)}")
        commit = commit or resolve_revision(name, self.repo_id, self.revision)
        rows = streamed_rows(name, self.repo_id, None, {split: self.files[split]}, split, commit)
        description = {
            "source": name,
            "split": split,
            "repo_id": self.repo_id,
            "file": self.files[split],
            "revision": self.revision or "main",
            "commit": commit,
        }
        if self.default_max_windows is not None:
            description["default_max_windows"] = self.default_max_windows
        return TextSource(
            name,
            _column_of(rows, self.column, name),
            self.separator,
            description,
            max_documents=self.max_documents,
            default_max_windows=self.default_max_windows,
        )


_C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"

NAMED_SOURCES: dict[str, HubSource] = {
    "wikitext2": HubSource(
        repo_id="Salesforce/wikitext",
        files={split: f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet" for split in SPLITS},
        column="text",
        separator="\n\n",
    ),
    # GPTQ's "c4-new": the first 1,100 documents of one validation shard, evaluated on 256 windows.
    "c4": HubSource(
        repo_id="allenai/c4",
        files={split: _C4_VALIDATION for split in SPLITS},
        column="text",
        separator=" ",
        max_documents=1100,
        default_max_windows=256,
    ),
    # The ptb_text_only loading script no longer runs under datasets 4+; the hub's parquet conversion does.
    "ptb": HubSource(
        repo_id="ptb-text-only/ptb_text_only",
        files={split: f"penn_treebank/{split}/0000.parquet" for split in SPLITS},
        column="sentence",
        separator=" ",
        revision="refs/convert/parquet",
    ),
}

HUB_PREFIX = "hf:"
# hf:OWNER/NAME[:CONFIG][@SPLIT][#COLUMN], or hf:PATH for a local dataset directory.
_HUB_SPEC = re.compile(r"^(?P<path>[^:@#]+)(?::(?P<config>[^@#]+))?(?:@(?P<split>[^#]+))?(?:#(?P<column>.+))?$")
# A streamed hub dataset, read without a window count (perplexity, routing), stops at this many windows.
HUB_DEFAULT_MAX_WINDOWS = 256


def open_text(source: str, split: str = "test", commit: str | None = None) -> TextSource:
    """A named source's split, a dataset (`hf:OWNER/NAME[:CONFIG][@SPLIT][#COLUMN]` on the hub, `hf:DIR` or
    a directory for a local one), or a local file (.txt or any other text, .jsonl, .json, .parquet; split
    ignored). Cheap checks and the hub revision come first; documents are read when iterated. `commit`
    pins a hub source to the commit a recipe recorded.

    A bare name in NAMED_SOURCES wins over a file of the same name; write ./name for the file.
    """
    if source in NAMED_SOURCES:
        return NAMED_SOURCES[source].open(source, split, commit)
    if source.startswith(HUB_PREFIX):
        return _open_dataset(source, split, commit)
    path = Path(source).expanduser()
    if path.is_dir():
        return _open_dataset(HUB_PREFIX + source, split, None)
    return _open_local(path)


def load_text(source: str, split: str = "test") -> LoadedText:
    """The whole text of a source (see open_text), its documents joined."""
    opened = open_text(source, split)
    documents = read_documents(opened.name, lambda _: opened.documents(), opened.max_documents)
    text = _non_empty(opened.separator.join(documents), opened.name)
    return LoadedText(text, {**opened.description, "documents": len(documents), "characters": len(text)})


def resolve_revision(name: str, repo_id: str, revision: str | None) -> str:
    """The commit a hub dataset's revision points at now, recorded so that a replay reads the same rows."""
    try:
        return huggingface_hub.HfApi().dataset_info(repo_id, revision=revision).sha
    except (*HUB_ERRORS, ValueError) as error:
        raise CmoeError(
            f"{name}: could not reach {repo_id} on the Hugging Face hub and no cached copy exists "
            f"({type(error).__name__}: {first_line(error)}); {OFFLINE_HINT}"
        ) from error


def streamed_rows(name: str, path: str, config: str | None, data_files, split: str, revision: str | None):
    """The split's rows as a `datasets` stream (nothing is downloaded whole; a saved `save_to_disk`
    directory is read from its Arrow files); one CmoeError when the dataset cannot be opened."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if revision is None and (Path(path) / "state.json").is_file():
            return datasets.load_from_disk(path).to_iterable_dataset()
        if revision is None and (Path(path) / "dataset_dict.json").is_file():
            return datasets.load_from_disk(path)[split].to_iterable_dataset()
        return datasets.load_dataset(
            path, name=config, data_files=data_files, split=split, streaming=True, revision=revision
        )
    except (*HUB_ERRORS, KeyError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise CmoeError(f"{name}: cannot open the dataset ({type(error).__name__}: {first_line(error)})") from error


def _open_dataset(spec: str, split: str, commit: str | None) -> TextSource:
    match = _HUB_SPEC.match(spec.removeprefix(HUB_PREFIX))
    if match is None:
        raise CmoeError(f"{spec}: expected hf:OWNER/NAME[:CONFIG][@SPLIT][#COLUMN] or hf:DIRECTORY")
    path, config, column = match["path"], match["config"], match["column"]
    split = match["split"] or split
    local = Path(path).expanduser()
    if local.is_dir():
        revision, where = None, {"path": str(local.resolve())}
        path = str(local.resolve())
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise CmoeError(f"{spec}: no such dataset directory, and not a hub id (hf:OWNER/NAME)")
    else:
        revision = commit or resolve_revision(spec, path, None)
        where = {"repo_id": path, "commit": revision}
    rows = streamed_rows(spec, path, config, None, split, revision)
    column = column or _text_column(rows, spec)
    description = {"source": spec, **where, "config": config, "split": split, "column": column}
    return TextSource(
        spec,
        _column_of(rows, column, spec),
        LOCAL_SEPARATOR,
        description,
        read_whole=False,
        default_max_windows=HUB_DEFAULT_MAX_WINDOWS,
    )


def _text_column(rows, name: str) -> str:
    """`text` when the dataset has it, else its only string column; otherwise the user must say (#COLUMN)."""
    features = getattr(rows, "features", None) or {}
    strings = [key for key, kind in features.items() if getattr(kind, "dtype", None) in ("string", "large_string")]
    if "text" in features or not features:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise CmoeError(
        f"{name}: no `text` column; name the text column with #COLUMN (string columns: {', '.join(strings) or 'none'})"
    )


def _column_of(rows, column: str, name: str) -> Callable[[], Iterator[str]]:
    def documents() -> Iterator[str]:
        for number, row in enumerate(rows, 1):
            if column not in row:
                raise CmoeError(f"{name}: no `{column}` column (columns: {', '.join(row) or 'none'})")
            value = row[column]
            if value is not None and not isinstance(value, str):
                raise CmoeError(f"{name}: row {number}: column `{column}` holds {type(value).__name__}, expected text")
            yield value or ""

    return documents


def _open_local(path: Path) -> TextSource:
    if not path.exists():
        raise CmoeError(
            f"{path}: no such file, and not a named source ({', '.join(NAMED_SOURCES)}); "
            "expected a named source, hf:OWNER/NAME, or a local file path (.txt, .jsonl, .json, .parquet)"
        )
    reader = LOCAL_READERS.get(path.suffix.lower(), plain_text)
    description = {
        "path": str(path.resolve()),
        "format": path.suffix.lower().lstrip(".") if path.suffix.lower() in LOCAL_READERS else "text",
        "sha256": _sha256(path),
    }
    return TextSource(str(path), lambda: reader(path), LOCAL_SEPARATOR, description)


def _non_empty(text: str, name: str) -> str:
    if not text.strip():
        raise CmoeError(f"{name}: the text is empty (nothing but whitespace)")
    return text


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
