"""Calibration and evaluation text: a named source fetched from the Hugging Face hub, or a local file."""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from cmoe.errors import CmoeError

from .formats import Reader, json_document, json_lines, parquet_column, plain_text, read_documents

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
class HubSource:
    """A named text on the hub: which file holds each split, how to read its documents and how GPTQ joins them."""

    repo_id: str
    files: Mapping[str, str]
    reader: Reader
    separator: str
    revision: str | None = None
    max_documents: int | None = None
    default_max_windows: int | None = None

    def fetch(self, name: str, split: str) -> Path:
        """The local (cached) copy of the split's file; one CmoeError when neither the hub nor the cache has it."""
        try:
            path = huggingface_hub.hf_hub_download(
                self.repo_id, self.files[split], repo_type="dataset", revision=self.revision
            )
        except (HfHubHTTPError, EntryNotFoundError, OSError) as error:
            raise CmoeError(
                f"{name}: could not fetch {self.repo_id}/{self.files[split]} from the Hugging Face hub and no cached "
                f"copy exists ({type(error).__name__}); {OFFLINE_HINT}"
            ) from error
        return Path(path)

    def load(self, name: str, split: str) -> LoadedText:
        """The split's documents (the first `max_documents` only) joined GPTQ's way."""
        if split not in self.files:
            raise CmoeError(f"{name}: unknown split {split!r}, expected one of {', '.join(self.files)}")
        path = self.fetch(name, split)
        documents = read_documents(path, self.reader, self.max_documents)
        text = _non_empty(self.separator.join(documents), name)
        description = {
            "source": name,
            "split": split,
            "repo_id": self.repo_id,
            "file": self.files[split],
            "revision": self.revision or "main",
            "sha256": _sha256(path),
            "documents": len(documents),
            "characters": len(text),
        }
        if self.default_max_windows is not None:
            description["default_max_windows"] = self.default_max_windows
        return LoadedText(text, description)


_C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"

NAMED_SOURCES: dict[str, HubSource] = {
    "wikitext2": HubSource(
        repo_id="Salesforce/wikitext",
        files={split: f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet" for split in SPLITS},
        reader=parquet_column("text"),
        separator="\n\n",
    ),
    # GPTQ's "c4-new": the first 1,100 documents of one validation shard, evaluated on 256 windows.
    "c4": HubSource(
        repo_id="allenai/c4",
        files={split: _C4_VALIDATION for split in SPLITS},
        reader=json_lines,
        separator=" ",
        max_documents=1100,
        default_max_windows=256,
    ),
    # The ptb_text_only loading script no longer runs under datasets 4+; the hub's parquet conversion does.
    "ptb": HubSource(
        repo_id="ptb-text-only/ptb_text_only",
        files={split: f"penn_treebank/{split}/0000.parquet" for split in SPLITS},
        reader=parquet_column("sentence"),
        separator=" ",
        revision="refs/convert/parquet",
    ),
}


def load_text(source: str, split: str = "test") -> LoadedText:
    """A named source's split, or a local file (.txt or any other text, .jsonl, .json, .parquet; split ignored).

    A bare name in NAMED_SOURCES wins over a file of the same name; write ./name for the file.
    """
    if source in NAMED_SOURCES:
        return NAMED_SOURCES[source].load(source, split)
    return _load_local(Path(source).expanduser())


def _load_local(path: Path) -> LoadedText:
    if not path.exists():
        raise CmoeError(
            f"{path}: no such file, and not a named source ({', '.join(NAMED_SOURCES)}); "
            "expected a named source or a local file path (.txt, .jsonl, .json, .parquet)"
        )
    if path.is_dir():
        raise CmoeError(f"{path}: is a directory, expected a text file (.txt, .jsonl, .json, .parquet)")
    documents = read_documents(path, LOCAL_READERS.get(path.suffix.lower(), plain_text))
    text = _non_empty(LOCAL_SEPARATOR.join(documents), str(path))
    description = {
        "path": str(path.resolve()),
        "format": path.suffix.lower().lstrip(".") if path.suffix.lower() in LOCAL_READERS else "text",
        "sha256": _sha256(path),
        "documents": len(documents),
        "characters": len(text),
    }
    return LoadedText(text, description)


def _non_empty(text: str, name: str) -> str:
    if not text.strip():
        raise CmoeError(f"{name}: the text is empty (nothing but whitespace)")
    return text


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
