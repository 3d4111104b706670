"""Calibration and evaluation text: local formats, named hub sources (mocked hub), windows."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from cmoe.calibration import calibration_windows, evaluation_windows, load_text, sources, tokenize_text
from cmoe.errors import CmoeError

from conftest import TINYSTORIES_MODEL, TINYSTORIES_VALID, WIKI_VALID

DOCS = ["First story about a cat.", "Second story about a dog."]


def write_formats(directory):
    (directory / "a.txt").write_text(DOCS[0] + "\n\n" + DOCS[1])
    (directory / "a.jsonl").write_text("\n".join(json.dumps({"text": doc, "id": i}) for i, doc in enumerate(DOCS)) + "\n")
    (directory / "a.json").write_text(json.dumps([{"text": doc} for doc in DOCS]))
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2]}), directory / "a.parquet")
    return directory


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl", "a.json", "a.parquet"])
def test_every_local_format_gives_the_same_text(tmp_path, name):
    loaded = load_text(str(write_formats(tmp_path) / name), split="train")
    assert loaded.text == DOCS[0] + "\n\n" + DOCS[1]
    assert loaded.description["sha256"] and loaded.description["path"].endswith(name)
    json.dumps(loaded.description)


def test_crlf_text_reads_with_unix_newlines(tmp_path):
    (tmp_path / "w.raw").write_bytes(b" = Title = \r\n Body line .\r\n")
    assert load_text(str(tmp_path / "w.raw")).text == " = Title = \n Body line .\n"


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("empty.txt", b"  \n\t", "empty"),
        ("binary.txt", b"\x80\x81\xfe\xff" * 10, "not UTF-8"),
        ("bad.json", b"[{\"text\": ", "invalid JSON"),
        ("bad.jsonl", b'{"body": "no text field"}\n', "no string `text` field"),
        ("bad.parquet", b"PAR1 this is not parquet", "unreadable"),
    ],
)
def test_unreadable_or_empty_files_fail_in_one_line(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CmoeError, match=expected) as error:
        load_text(str(tmp_path / name))
    assert "\n" not in str(error.value) and name in str(error.value)


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "x.parquet")
    with pytest.raises(CmoeError, match="x.parquet"):
        load_text(str(tmp_path / "x.parquet"))


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(CmoeError, match="no such file.*wikitext2"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(CmoeError, match="directory"):
        load_text(str(tmp_path))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """hf_hub_download answered from local files laid out like the real repositories."""
    pq.write_table(pa.table({"text": ["", " = A = ", " body "]}), tmp_path / "wiki.parquet")
    with gzip.open(tmp_path / "c4.json.gz", "wt") as handle:
        for i in range(1200):
            handle.write(json.dumps({"text": f"doc{i}", "url": "u"}) + "\n")
    pq.write_table(pa.table({"sentence": ["no it was n't", "black monday"]}), tmp_path / "ptb.parquet")
    calls = []

    def download(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type, revision))
        return str(tmp_path / {"Salesforce/wikitext": "wiki.parquet", "allenai/c4": "c4.json.gz"}.get(repo_id, "ptb.parquet"))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_named_sources_follow_the_gptq_joining_conventions(fake_hub):
    wiki = load_text("wikitext2", split="test")
    assert wiki.text == "\n\n = A = \n\n body "
    assert fake_hub[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet", "dataset", None)
    c4 = load_text("c4", split="validation")
    assert c4.text.split(" ") == [f"doc{i}" for i in range(1100)]
    assert c4.description["default_max_windows"] == 256
    ptb = load_text("ptb", split="train")
    assert ptb.text == "no it was n't black monday" and fake_hub[-1][3] == "refs/convert/parquet"
    with pytest.raises(CmoeError, match="split"):
        load_text("wikitext2", split="dev")


def test_named_source_offline_without_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CmoeError, match="pass a local file"):
        load_text("wikitext2", split="train")


def test_tokenize_and_windows_on_real_text():
    tokenizer = AutoTokenizer.from_pretrained(TINYSTORIES_MODEL)
    tokens = tokenize_text(load_text(str(TINYSTORIES_VALID)).text, tokenizer)
    assert tokens.dtype == torch.long and tokens.numel() > 5000
    first = calibration_windows(tokens, 8, 128, seed=0)
    assert first.shape == (8, 128)
    assert torch.equal(first, calibration_windows(tokens, 8, 128, seed=0))
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(first, calibration_windows(tokens, 8, 128, seed=0))
    assert not torch.equal(first, calibration_windows(tokens, 8, 128, seed=1))
    joined = tokens.tolist()
    for window in first.tolist():
        start = next(i for i in range(len(joined)) if joined[i : i + 128] == window)
        assert start + 128 <= len(joined)


def test_evaluation_windows_are_consecutive_and_drop_the_tail():
    tokens = torch.arange(1000)
    windows = evaluation_windows(tokens, 300)
    assert windows.tolist() == [list(range(0, 300)), list(range(300, 600)), list(range(600, 900))]
    assert evaluation_windows(tokens, 300, max_windows=2).shape == (2, 300)
    with pytest.raises(CmoeError, match="1000 tokens"):
        evaluation_windows(tokens, 2048)


def test_calibration_needs_one_window_of_tokens():
    with pytest.raises(CmoeError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 2, 64, seed=0)
    with pytest.raises(CmoeError):
        calibration_windows(torch.arange(100), 0, 64, seed=0)


def test_wikitext_valid_tokens_loads_whole():
    loaded = load_text(str(WIKI_VALID))
    assert loaded.description["characters"] == len(loaded.text) > 1_000_000


def test_registry_names_every_named_source():
    assert set(sources.NAMED_SOURCES) == {"wikitext2", "c4", "ptb"}
