"""Readers that turn a file into its list of documents, with unreadable files reported in one line."""

import gzip
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cmoe.errors import HUB_ERRORS, CmoeError

Reader = Callable[[Path], Iterable[str]]


def plain_text(path: Path) -> list[str]:
    """The whole file as one document: UTF-8 (a BOM is dropped), universal newlines."""
    text = path.read_text(encoding="utf-8-sig")
    if "\x00" in text:
        raise CmoeError(f"{path}: unreadable, looks binary (contains NUL bytes), expected UTF-8 text")
    return [text]


def json_lines(path: Path) -> Iterator[str]:
    """One JSON record per line (gzip-compressed when the name ends in .gz); blank lines are skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield _record_text(_parse_json(line, f"{path}: line {number}"), f"{path}: line {number}")


def json_document(path: Path) -> list[str]:
    """A JSON list of records (or of strings), or a single record; falls back to JSON lines."""
    raw = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return list(json_lines(path))
    records = value if isinstance(value, list) else [value]
    return [_record_text(record, f"{path}: item {number}") for number, record in enumerate(records, 1)]


def parquet_column(column: str) -> Reader:
    """A reader for one string column of a parquet file (nulls read as empty documents)."""

    def read(path: Path) -> list[str]:
        schema = pq.read_schema(path)
        if column not in schema.names:
            raise CmoeError(f"{path}: no `{column}` column (columns: {', '.join(schema.names) or 'none'})")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise CmoeError(f"{path}: column `{column}` holds {kind}, expected text")
        return [value or "" for value in pq.read_table(path, columns=[column]).column(column).to_pylist()]

    return read


def read_documents(path, reader: Reader, limit: int | None = None, lazy: bool = False):
    """The first `limit` documents (all when None), any failure to read them as one CmoeError naming the
    file (or source); with `lazy`, as an iterator that reads them as they are taken."""
    documents = _guarded(path, reader, limit)
    return documents if lazy else list(documents)


def _guarded(path, reader: Reader, limit: int | None) -> Iterator[str]:
    try:
        yield from islice(reader(path), limit)
    except CmoeError:
        raise
    except UnicodeDecodeError as error:
        raise CmoeError(f"{path}: unreadable, not UTF-8 text (invalid byte at position {error.start})") from error
    except (*HUB_ERRORS, ValueError, EOFError, zlib.error, pa.ArrowException) as error:
        raise CmoeError(f"{path}: unreadable ({type(error).__name__}: {first_line(error)})") from error


def _parse_json(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise CmoeError(f"{where}: invalid JSON ({error.msg})") from error


def _record_text(record: object, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    raise CmoeError(f"{where} has no string `text` field")


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no details"
