"""Calibration and evaluation text: named hub sources and local files, tokenised once, cut into windows."""

import gzip
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cmoe.errors import CmoeError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class LoadedText:
    """The text and a JSON-serialisable description of where it came from (for recipes)."""

    text: str
    description: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HubSource:
    """A named source on the Hugging Face hub: which file holds each split and how documents are joined."""

    repo_id: str
    files: dict[str, str]
    read_documents: Callable[[Path], list[str]]
    separator: str
    revision: str | None = None
    max_documents: int | None = None
    default_max_windows: int | None = None


def _parquet_column(column: str) -> Callable[[Path], list[str]]:
    def read(path: Path) -> list[str]:
        import pyarrow.parquet as pq

        return [value or "" for value in pq.read_table(path, columns=[column]).column(column).to_pylist()]

    return read


def _gzip_json_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


_C4_FILE = "en/c4-validation.00000-of-00008.json.gz"
NAMED_SOURCES: dict[str, HubSource] = {
    "wikitext2": HubSource(
        repo_id="Salesforce/wikitext",
        files={split: f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet" for split in SPLITS},
        read_documents=_parquet_column("text"),
        separator="\n\n",
    ),
    "c4": HubSource(
        repo_id="allenai/c4",
        files={split: _C4_FILE for split in SPLITS},
        read_documents=_gzip_json_lines,
        separator=" ",
        max_documents=1100,
        default_max_windows=256,
    ),
    "ptb": HubSource(
        repo_id="ptb-text-only/ptb_text_only",
        files={split: f"penn_treebank/{split}/0000.parquet" for split in SPLITS},
        read_documents=_parquet_column("sentence"),
        separator=" ",
        revision="refs/convert/parquet",
    ),
}


def _fetch(name: str, spec: HubSource, split: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(hf_hub_download(spec.repo_id, spec.files[split], repo_type="dataset", revision=spec.revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        raise CmoeError(
            f"cannot fetch {name} ({spec.repo_id}) from the Hugging Face hub and no cached copy exists: "
            f"pass a local file instead, e.g. --data path/to/text.txt ({type(error).__name__})"
        ) from error


def _load_named(name: str, split: str) -> LoadedText:
    if split not in SPLITS:
        raise CmoeError(f"split {split!r} of {name}: expected one of {', '.join(SPLITS)}")
    spec = NAMED_SOURCES[name]
    path = _fetch(name, spec, split)
    documents = spec.read_documents(path)[: spec.max_documents]
    text = spec.separator.join(documents)
    description = {
        "source": name,
        "split": split,
        "repo_id": spec.repo_id,
        "file": spec.files[split],
        "revision": spec.revision or "main",
        "documents": len(documents),
        "characters": len(text),
    }
    if spec.default_max_windows:
        description["default_max_windows"] = spec.default_max_windows
    return LoadedText(_non_empty(text, name), description)


def _read_local(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_column("text")(path)
    raw = path.read_bytes().decode("utf-8")
    if suffix == ".jsonl" or (suffix == ".json" and not raw.lstrip().startswith("[")):
        return [_text_field(json.loads(line), path, number) for number, line in enumerate(raw.splitlines(), 1) if line.strip()]
    if suffix == ".json":
        return [_text_field(item, path, number) for number, item in enumerate(json.loads(raw), 1)]
    return [raw.replace("\r\n", "\n").replace("\r", "\n")]


def _text_field(item, path: Path, number: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise CmoeError(f"{path}: record {number} has no string `text` field")


def _load_local(path: Path) -> LoadedText:
    if path.is_dir():
        raise CmoeError(f"{path}: is a directory, expected a text file")
    try:
        documents = _read_local(path)
    except CmoeError:
        raise
    except UnicodeDecodeError as error:
        raise CmoeError(f"{path}: unreadable, not UTF-8 text ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise CmoeError(f"{path}: unreadable, invalid JSON ({error.msg}, line {error.lineno})") from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CmoeError(f"{path}: unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    text = "\n\n".join(documents) if len(documents) > 1 else (documents[0] if documents else "")
    description = {
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "documents": len(documents),
        "characters": len(text),
    }
    return LoadedText(_non_empty(text, str(path)), description)


def _non_empty(text: str, name: str) -> str:
    if not text.strip():
        raise CmoeError(f"{name}: the text is empty")
    return text


def load_text(source: str, split: str = "test") -> LoadedText:
    """A named hub source (its `split`) or a local file (.txt and other text, .jsonl, .json, .parquet)."""
    if source in NAMED_SOURCES:
        return _load_named(source, split)
    path = Path(source).expanduser()
    if not path.exists():
        raise CmoeError(
            f"{source}: no such file, and not a named source ({', '.join(NAMED_SOURCES)}): expected a local text file"
        )
    return _load_local(path)


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """The whole text tokenised once (GPTQ convention, the tokenizer's default special tokens)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # silence "sequence length is longer than the specified maximum"
    try:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        logging.set_verbosity(verbosity)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded uniform random starts (independent of global RNG)."""
    if nsamples < 1 or seqlen < 1:
        raise CmoeError(f"need at least one window of at least one token (nsamples {nsamples}, seqlen {seqlen})")
    if tokens.numel() < seqlen:
        raise CmoeError(f"the calibration text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, tokens.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([tokens[start : start + seqlen] for start in starts])


def evaluation_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """GPTQ protocol: consecutive non-overlapping windows from the start, trailing partial window dropped."""
    count = tokens.numel() // seqlen
    if count == 0:
        raise CmoeError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return tokens[: count * seqlen].view(count, seqlen)
