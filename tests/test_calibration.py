"""cmoe.calibration: local formats, named hub sources (hub mocked, or really offline), tokenising and windows."""

import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import huggingface_hub.constants
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

from cmoe.calibration import (
    NAMED_SOURCES,
    SPLITS,
    calibration_windows,
    evaluation_windows,
    load_text,
    open_text,
    sources,
    tokenize_text,
)

from cmoe.errors import CmoeError

from conftest import TINYSTORIES_MODEL, TINYSTORIES_VALID, WIKI_VALID

TOKENIZER_DIR = TINYSTORIES_MODEL
WIKITEXT_VALID = WIKI_VALID

DOCS = ["Once upon a time, a cat sat.", "The dog ran home.\nIt was late.", "Ünïcödé — ok."]
JOINED = "\n\n".join(DOCS)


@pytest.fixture(autouse=True)
def _never_online(monkeypatch):
    """No test here may reach the network, even if a mock is missed (the hub reads this flag at call time)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _one_line_naming(error: pytest.ExceptionInfo, name: str) -> str:
    message = str(error.value)
    assert "\n" not in message and name in message
    return message


# ---------------------------------------------------------------- local files


def _write(directory: Path, name: str) -> Path:
    path = directory / name
    records = [{"text": doc, "id": i} for i, doc in enumerate(DOCS)]
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"id": [0, 1, 2], "text": DOCS}), path)
    elif name == "list.json":
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    elif name == "strings.json":
        path.write_text(json.dumps(DOCS), encoding="utf-8")
    elif name.endswith((".jsonl", ".json")):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    else:
        path.write_text(JOINED, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name", ["a.txt", "a.raw", "a.tokens", "noext", "a.jsonl", "list.json", "strings.json", "lines.json", "a.parquet"]
)
def test_every_local_format_loads_the_same_text(tmp_path, name):
    path = _write(tmp_path, name)
    loaded = load_text(str(path), split="train")
    assert loaded.text == JOINED
    assert load_text(str(path), split="test") == loaded  # split is ignored for files
    described = json.loads(json.dumps(loaded.description))
    assert described["path"] == str(path.resolve())
    assert described["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert described["characters"] == len(JOINED)
    assert described["documents"] == (1 if "." not in name or name.endswith((".txt", ".raw", ".tokens")) else 3)


def test_text_files_use_universal_newlines_and_drop_a_bom(tmp_path):
    (tmp_path / "w.raw").write_bytes(b"\xef\xbb\xbf = Title = \r\n Body .\r\n\rend")
    assert load_text(str(tmp_path / "w.raw"), "test").text == " = Title = \n Body .\n\nend"


def test_single_json_object_with_text(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"text": DOCS[0]}, indent=1))
    assert load_text(str(tmp_path / "one.json"), "test").text == DOCS[0]


def test_real_wikitext_file_loads_whole():
    loaded = load_text(str(WIKITEXT_VALID), "validation")
    assert loaded.description["characters"] == len(loaded.text) == len(WIKITEXT_VALID.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"  \n\t\r\n", "empty"),
        ("blank.jsonl", b'{"text": "  "}\n{"text": ""}\n', "empty"),
        ("latin1.txt", "café".encode("latin-1"), "not UTF-8"),
        ("binary.bin", bytes(range(256)) * 4, "not UTF-8"),
        ("nul.txt", b"abc\x00def", "binary"),
        ("bad.json", b'[{"text": ', "invalid JSON"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2: invalid JSON"),
        ("notext.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', "line 2 has no string `text` field"),
        ("nulltext.jsonl", b'{"text": null}\n', "no string `text` field"),
        ("numbers.json", b"[1, 2]", "item 1 has no string `text` field"),
        ("corrupt.parquet", b"PAR1 this is not parquet at all PAR1", "unreadable"),
        ("empty.parquet", b"", "unreadable"),
    ],
)
def test_unreadable_or_empty_files_raise_one_line(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CmoeError, match=expected) as error:
        load_text(str(tmp_path / name), "test")
    _one_line_naming(error, name)


@pytest.mark.parametrize(
    "table,expected", [({"body": DOCS}, "no `text` column.*body"), ({"text": [1, 2]}, "expected text")]
)
def test_parquet_needs_a_text_column(tmp_path, table, expected):
    pq.write_table(pa.table(table), tmp_path / "x.parquet")
    with pytest.raises(CmoeError, match=expected) as error:
        load_text(str(tmp_path / "x.parquet"), "test")
    _one_line_naming(error, "x.parquet")


def test_missing_path_lists_the_named_sources(tmp_path):
    with pytest.raises(CmoeError, match="no such file") as error:
        load_text(str(tmp_path / "nope.txt"), "test")
    message = _one_line_naming(error, "nope.txt")
    assert all(name in message for name in NAMED_SOURCES) and "local file" in message
    with pytest.raises(CmoeError, match="not a named source"):
        load_text("wikitext", "test")


def test_directory_without_a_dataset_is_refused(tmp_path):
    with pytest.raises(CmoeError, match="cannot open the dataset") as error:
        load_text(str(tmp_path), "test")
    _one_line_naming(error, str(tmp_path))


# ---------------------------------------------------------------- named sources, hub mocked

WIKI_ROWS = ["", " = Valkyria = \n", " Senjō no Valkyria 3 .\n", ""]
PTB_ROWS = ["no it was n't black monday", "but while the new york stock exchange did n't fall"]
C4_DOCS = [f"doc {i}." for i in range(1200)]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_layout(root: Path) -> dict[str, Path]:
    """repo_id -> a local directory holding tiny stand-ins at the real repositories' file paths."""
    layout = {repo: root / repo.replace("/", "--") for repo in ("Salesforce/wikitext", "ptb-text-only/ptb_text_only")}
    for split in SPLITS:
        wiki = layout["Salesforce/wikitext"] / f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet"
        ptb = layout["ptb-text-only/ptb_text_only"] / f"penn_treebank/{split}/0000.parquet"
        for path, column, rows in ((wiki, "text", WIKI_ROWS), (ptb, "sentence", PTB_ROWS)):
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({column: [f"{split}:"] + rows}), path)
    layout["allenai/c4"] = root / "allenai--c4"
    c4 = layout["allenai/c4"] / "en/c4-validation.00000-of-00008.json.gz"
    c4.parent.mkdir(parents=True)
    with gzip.open(c4, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": doc, "timestamp": "2019", "url": "u"}) + "\n" for doc in C4_DOCS)
    return layout


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The hub answered from local directories laid out like the real repositories, read by the real
    `datasets` streaming code; records each (repo_id, data files, split, commit) opened."""
    layout = _hub_layout(tmp_path)
    calls = []
    stream = sources.streamed_rows

    def revision(name, repo_id, revision):
        assert repo_id in layout
        return COMMIT

    def rows(name, path, config, data_files, split, revision):
        calls.append((path, data_files, split, revision))
        return stream(name, str(layout[path]), config, data_files, split, None)

    monkeypatch.setattr(sources, "resolve_revision", revision)
    monkeypatch.setattr(sources, "streamed_rows", rows)
    return calls


@pytest.mark.parametrize("split", SPLITS)
def test_wikitext2_joins_rows_with_blank_lines(fake_hub, split):
    loaded = load_text("wikitext2", split)
    assert loaded.text == "\n\n".join([f"{split}:"] + WIKI_ROWS)
    file = f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet"
    assert fake_hub == [("Salesforce/wikitext", {split: file}, split, COMMIT)]
    assert json.loads(json.dumps(loaded.description)) == {
        "source": "wikitext2",
        "split": split,
        "repo_id": "Salesforce/wikitext",
        "file": file,
        "revision": "main",
        "commit": COMMIT,
        "documents": 5,
        "characters": len(loaded.text),
    }


@pytest.mark.parametrize("split", SPLITS)
def test_c4_is_the_first_1100_validation_documents_joined_by_spaces(fake_hub, split):
    loaded = load_text("c4", split)
    assert loaded.text == " ".join(C4_DOCS[:1100])
    assert loaded.description["documents"] == 1100 and loaded.description["default_max_windows"] == 256
    assert fake_hub == [("allenai/c4", {split: "en/c4-validation.00000-of-00008.json.gz"}, split, COMMIT)]


@pytest.mark.parametrize("split", SPLITS)
def test_ptb_joins_sentences_with_spaces_from_the_parquet_conversion(fake_hub, split):
    loaded = load_text("ptb", split)
    assert loaded.text == " ".join([f"{split}:"] + PTB_ROWS)
    file = f"penn_treebank/{split}/0000.parquet"
    assert fake_hub == [("ptb-text-only/ptb_text_only", {split: file}, split, COMMIT)]
    assert loaded.description["revision"] == "refs/convert/parquet" and "default_max_windows" not in loaded.description


def test_a_recorded_commit_is_read_again_without_asking_the_hub(fake_hub, monkeypatch):
    monkeypatch.setattr(sources, "resolve_revision", lambda *args: pytest.fail("the hub was asked"))
    assert open_text("wikitext2", "test", commit="f" * 40).description["commit"] == "f" * 40
    assert fake_hub[0][3] == "f" * 40


def test_unknown_split_fails_before_any_download(fake_hub):
    with pytest.raises(CmoeError, match="split 'dev'.*train, validation, test") as error:
        load_text("wikitext2", "dev")
    _one_line_naming(error, "wikitext2")
    assert fake_hub == []


def test_registry_defines_every_split_of_every_source():
    assert set(NAMED_SOURCES) == {"wikitext2", "c4", "ptb"}
    assert all(set(spec.files) == set(SPLITS) for spec in NAMED_SOURCES.values())


@pytest.mark.parametrize(
    "failure",
    [
        LocalEntryNotFoundError("cannot find the requested files in the local cache"),
        OfflineModeIsEnabled("offline"),
        ConnectionError("network unreachable"),
    ],
)
def test_unfetchable_named_source_asks_for_a_local_file(monkeypatch, failure):
    def dataset_info(*args, **kwargs):
        raise failure

    monkeypatch.setattr(sources.huggingface_hub.HfApi, "dataset_info", dataset_info)
    with pytest.raises(CmoeError, match="Hugging Face hub.*no cached copy.*local file.*--data") as error:
        load_text("ptb", "test")
    _one_line_naming(error, "ptb")


@pytest.mark.slow
def test_really_offline_with_an_empty_cache_gives_one_clear_error(tmp_path):
    """No mocks: HF_HUB_OFFLINE=1 and an empty HF_HOME, in a fresh interpreter (the hub reads them at import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    script = (
        "from cmoe.calibration import load_text\n"
        "from cmoe.errors import CmoeError\n"
        "try:\n    load_text('wikitext2', 'test')\n"
        "except CmoeError as error:\n    print(error)\n    raise SystemExit(3)\n"
    )
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and "wikitext2" in lines[0] and "no cached copy" in lines[0] and "local file" in lines[0]


# ---------------------------------------------------------------- tokenising and windows


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def story_tokens(tokenizer):
    return tokenize_text(load_text(str(TINYSTORIES_VALID), "train").text, tokenizer)


def test_tokenize_text_is_one_pass_with_default_special_tokens(tokenizer, story_tokens):
    text = TINYSTORIES_VALID.read_text(encoding="utf-8")
    assert story_tokens.dtype == torch.long and story_tokens.dim() == 1 and story_tokens.numel() > 5000
    assert torch.equal(story_tokens, tokenizer(text, return_tensors="pt").input_ids[0])


def test_tokenize_text_silences_the_too_long_warning(tokenizer, capfd):
    original = tokenizer.model_max_length
    tokenizer.model_max_length = 8
    try:
        tokens = tokenize_text("Once upon a time there was a very long story about many things.", tokenizer)
    finally:
        tokenizer.model_max_length = original
    assert tokens.numel() > 8
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_calibration_windows_are_seeded_real_slices(story_tokens):
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = calibration_windows(story_tokens, 16, 128, seed=0)
    assert first.shape == (16, 128) and first.dtype == torch.long
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    torch.manual_seed(123)
    random.seed(123)
    assert torch.equal(first, calibration_windows(story_tokens, 16, 128, seed=0))
    assert not torch.equal(first, calibration_windows(story_tokens, 16, 128, seed=1))
    every_slice = story_tokens.unfold(0, 128, 1)
    assert all((every_slice == window).all(dim=1).any() for window in first)


def test_calibration_window_starts_cover_both_ends():
    tokens = torch.arange(10)
    starts = {int(window[0]) for window in calibration_windows(tokens, 200, 9, seed=7)}
    assert starts == {0, 1}
    assert calibration_windows(torch.arange(5), 3, 5, seed=0).tolist() == [list(range(5))] * 3


def test_calibration_needs_enough_tokens_and_positive_sizes():
    with pytest.raises(CmoeError, match="10 tokens.*window of 64") as error:
        calibration_windows(torch.arange(10), 2, 64, seed=0)
    assert "\n" not in str(error.value)
    for nsamples, seqlen in [(0, 8), (2, 0), (-1, 8)]:
        with pytest.raises(CmoeError, match="at least one"):
            calibration_windows(torch.arange(100), nsamples, seqlen, seed=0)


def test_evaluation_windows_are_consecutive_and_drop_the_tail():
    tokens = torch.arange(1000)
    assert evaluation_windows(tokens, 300).tolist() == [list(range(300)), list(range(300, 600)), list(range(600, 900))]
    assert torch.equal(evaluation_windows(tokens, 300, max_windows=2), tokens[:600].reshape(2, 300))
    assert evaluation_windows(tokens, 300, max_windows=50).shape == (3, 300)
    assert evaluation_windows(tokens, 250).shape == (4, 250)


def test_evaluation_windows_on_real_text(story_tokens):
    windows = evaluation_windows(story_tokens, 256)
    assert windows.shape == (story_tokens.numel() // 256, 256)
    assert torch.equal(windows.flatten(), story_tokens[: windows.numel()])


def test_evaluation_needs_one_full_window():
    with pytest.raises(CmoeError, match="999 tokens.*window of 1000") as error:
        evaluation_windows(torch.arange(999), 1000)
    assert "\n" not in str(error.value)
    for seqlen, max_windows in [(0, None), (16, 0)]:
        with pytest.raises(CmoeError, match="at least one"):
            evaluation_windows(torch.arange(100), seqlen, max_windows)


def test_a_named_source_ignores_the_file_sha256_an_older_recipe_recorded(fake_hub):
    from cmoe.carving import calibration_tokens
    from cmoe.io.artifacts import StageTimer
    from cmoe.io.loading import prepare_model
    from cmoe.recipes import Calibration

    prepared = prepare_model(str(TOKENIZER_DIR), "cpu", "float32", kind="dense")
    _, windows, description = calibration_tokens(
        Calibration("wikitext2", nsamples=1, seqlen=8, sha256="ab" * 32), prepared, StageTimer()
    )
    assert windows.shape == (1, 8) and description["commit"] == COMMIT
