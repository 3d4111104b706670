"""Text through `datasets`: `hf:` hub ids (hub mocked by local directories), local dataset directories,
and streamed reading that stops at the tokens the windows need."""

import json
import os
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from cmoe import Calibration, CarveOptions, Compute, MoEShape, run_carve
from cmoe.calibration import TextSource, load_text, open_text, read_evaluation_windows, read_tokens, sources
from cmoe.calibration import stream_tokens, tokenize_text, windows
from cmoe.errors import CmoeError
from cmoe.io.recipe_file import read_recipe

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN

STORIES = TINYSTORIES_TRAIN.read_text(encoding="utf-8")[:60_000].split("<|endoftext|>")
COMMIT = "a" * 40


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINYSTORIES_MODEL)


@pytest.fixture
def parquet_dir(tmp_path):
    """A dataset directory as the hub holds them: data files per split, a text and a title column."""
    folder = tmp_path / "stories"
    (folder / "data").mkdir(parents=True)
    for split, rows in (("train", STORIES[:-10]), ("validation", STORIES[-10:])):
        table = pa.table({"title": [f"t{i}" for i in range(len(rows))], "body": rows, "n": list(range(len(rows)))})
        pq.write_table(table, folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def test_a_local_dataset_directory_reads_its_split_and_names_its_column(parquet_dir):
    with pytest.raises(CmoeError, match=r"no `text` column; name the text column with #COLUMN \(.*title, body"):
        open_text(f"hf:{parquet_dir}", "train")
    loaded = load_text(f"hf:{parquet_dir}@validation#body", "train")
    assert loaded.text == "\n\n".join(STORIES[-10:])
    assert loaded.description | {"characters": 0} == {
        "source": f"hf:{parquet_dir}@validation#body",
        "path": str(parquet_dir.resolve()),
        "config": None,
        "split": "validation",
        "column": "body",
        "documents": 10,
        "characters": 0,
    }


def test_a_saved_dataset_and_a_plain_directory_read_the_same(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": STORIES[:5], "id": list(range(5))}).save_to_disk(str(saved))
    assert load_text(str(saved)).text == load_text(f"hf:{saved}").text == "\n\n".join(STORIES[:5])


def test_the_only_text_column_is_taken_and_non_text_is_refused(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    pq.write_table(pa.table({"story": STORIES[:3], "n": [1, 2, 3]}), folder / "train.parquet")
    assert load_text(f"hf:{folder}", "train").description["column"] == "story"
    with pytest.raises(CmoeError, match="column `n` holds int, expected text"):
        load_text(f"hf:{folder}#n", "train")


def test_a_hub_dataset_is_streamed_at_its_resolved_commit(parquet_dir, monkeypatch):
    calls = []
    stream = sources.streamed_rows
    monkeypatch.setattr(sources, "resolve_revision", lambda name, repo, revision: COMMIT)

    def rows(name, path, config, data_files, split, revision):
        calls.append((path, config, split, revision))
        return stream(name, str(parquet_dir), None, data_files, split, None)

    monkeypatch.setattr(sources, "streamed_rows", rows)
    opened = open_text("hf:someone/stories:default@validation#body", "train")
    assert calls == [("someone/stories", "default", "validation", COMMIT)]
    assert opened.description["repo_id"] == "someone/stories" and opened.description["commit"] == COMMIT
    assert not opened.read_whole and opened.default_max_windows == sources.HUB_DEFAULT_MAX_WINDOWS
    open_text("hf:someone/stories#body", "train", commit="b" * 40)
    assert calls[-1] == ("someone/stories", None, "train", "b" * 40)


@pytest.mark.parametrize("spec", ["hf:", "hf:a/b/c", "hf:./missing-dir", "hf:name-only"])
def test_malformed_or_missing_datasets_fail_in_one_line(spec):
    with pytest.raises(CmoeError) as error:
        open_text(spec, "train")
    assert "\n" not in str(error.value) and spec in str(error.value)


@pytest.mark.slow
def test_offline_hub_dataset_answers_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    script = (
        "from cmoe.calibration import open_text\nfrom cmoe.errors import CmoeError\n"
        "try:\n    open_text('hf:someone/stories', 'train')\n"
        "except CmoeError as error:\n    print(error)\n    raise SystemExit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert len(result.stdout.splitlines()) == 1 and "local file" in result.stdout


def counted(documents: list[str], read: list[int]) -> TextSource:
    """A streamed source that counts the documents taken from it."""

    def stream():
        for document in documents:
            read[0] += 1
            yield document

    return TextSource("counted", stream, "\n\n", {"source": "counted"}, read_whole=False)


def test_a_bounded_read_stops_early_and_keeps_the_whole_texts_tokens(tokenizer):
    read = [0]
    whole = tokenize_text("\n\n".join(STORIES), tokenizer)
    stream = read_tokens(counted(STORIES, read), tokenizer, 500)
    assert read[0] < len(STORIES) / 4, "read far past the tokens needed"
    assert stream.tokens.numel() >= 500 + windows.CUT_MARGIN_TOKENS
    assert torch.equal(stream.tokens[:500], whole[:500])
    assert stream.description["documents"] == read[0] and stream.description["read"] != "whole"
    assert torch.equal(read_tokens(counted(STORIES, [0]), tokenizer).tokens, whole)


def test_evaluation_windows_of_a_bounded_read_equal_the_whole_texts(tokenizer):
    source = counted(STORIES, [0])
    bounded, _ = read_evaluation_windows(source, tokenizer, 128, 3)
    whole = tokenize_text("\n\n".join(STORIES), tokenizer)
    assert torch.equal(bounded, whole[: 3 * 128].reshape(3, 128))


def test_training_text_is_tokenised_in_pieces_of_whole_documents(tokenizer, monkeypatch):
    monkeypatch.setattr(windows, "TRAINING_PIECE_CHARACTERS", 2_000)
    read = [0]
    stream = stream_tokens(counted(STORIES, read), tokenizer, 3_000)
    assert 3_000 <= stream.tokens.numel() < 4_500 and read[0] < len(STORIES)
    whole = tokenize_text("\n\n".join(STORIES[: read[0]]), tokenizer)
    assert stream.tokens[0] == whole[0] == tokenizer.bos_token_id
    assert (stream.tokens == tokenizer.bos_token_id).sum() == 1, "special tokens only at the start"
    assert abs(stream.tokens.numel() - whole.numel()) <= read[0], "pieces cut only between documents"


def test_a_carve_on_a_dataset_directory_records_what_it_read(parquet_dir, tmp_path):
    out = tmp_path / "carved"
    run_carve(
        str(TINYSTORIES_MODEL),
        out,
        CarveOptions(MoEShape.parse("S1A1E4")),
        Calibration(f"hf:{parquet_dir}#body", nsamples=2, seqlen=64, seed=0),
        compute=Compute("cpu", "float32", 2),
    )
    calibration = read_recipe(out)["calibration"]
    assert calibration["path"] == str(parquet_dir.resolve()) and calibration["column"] == "body"
    assert calibration["split"] == "train" and calibration["text_tokens"] >= windows.STREAM_POOL * 2 * 64
    assert json.dumps(calibration)


@pytest.mark.slow
def test_an_unreachable_hub_answers_in_one_line(tmp_path, carved_dir):
    """A refused connection is the HTTP library's error, not an OSError: still one line, exit 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "hf_fake"}
    cli = [sys.executable, "-m", "cmoe.cli"]
    for command, expected in (
        (["eval", "perplexity", str(TINYSTORIES_MODEL), "--data", "hf:a/b", "--seqlen", "64"], "could not reach a/b"),
        (["push", str(carved_dir), "owner/name"], "the upload failed"),
    ):
        result = subprocess.run([*cli, *command], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert expected in result.stderr and "ConnectError" in result.stderr


def test_a_stream_that_opens_with_blank_documents_reads_on(tokenizer):
    documents = ["   "] * 200 + STORIES
    stream = read_tokens(counted(documents, [0]), tokenizer, 300)
    assert stream.tokens.numel() >= 300 and stream.description["documents"] > 200
