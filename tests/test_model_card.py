"""The artifact in the hub's terms: model cards built with huggingface_hub (base model, license, datasets,
measured results as model-index entries), results recorded into carved, exported and fine-tuned models,
code and tokenizer that load without cmoe, and `cmoe push` (the hub mocked: nothing leaves the machine)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoTokenizer

import cmoe
from cmoe import Calibration, CarveOptions, CmoeError, Compute, MoEShape, run_carve
from cmoe.export import run_export
from cmoe.finetune import FinetuneOptions, run_finetune
from cmoe.io import recipe_file
from cmoe.io.model_card import build_card, card_data, hub_model_id, record_results
from cmoe.io.push import UPLOAD_IGNORE
from cmoe.io.recipe_file import read_recipe

from conftest import TINYSTORIES_VALID, save_tiny_model
from test_cli import assert_one_line_error, run, tree

CPU = Compute("cpu", "float32", 2)
HUB_ID = "cmoe-tests/tiny-llama"
VALID = str(TINYSTORIES_VALID)

pytestmark = pytest.mark.usefixtures("one_thread")


def perplexity_entry(value: float, split: str = "test", dataset: str = "wikitext2") -> dict:
    return {
        "task": "perplexity",
        "dataset": {"name": dataset, "type": "Salesforce/wikitext", "split": split},
        "metrics": [{"type": "perplexity", "value": value}],
        "protocol": {"seqlen": 64, "windows": 2},
    }


PIQA = {
    "task": "piqa",
    "dataset": {"name": "piqa", "type": "baber/piqa", "split": "validation"},
    "metrics": [{"type": "acc", "value": 0.625, "stderr": 0.01}, {"type": "acc_norm", "value": 0.75}],
    "protocol": {"num_fewshot": 0, "limit": 8},
}


def card_of(directory: Path) -> ModelCard:
    return ModelCard.load(str(directory / "README.md"))


def results_of(directory: Path) -> dict[tuple[str, str], float]:
    """(task, metric) -> value, as the hub reads them from the card's model-index."""
    return {
        (result.task_name, result.metric_type): result.metric_value for result in card_of(directory).data.eval_results
    }


def copy_of(directory: Path, into: Path) -> Path:
    """A private copy: recording into the session's carved model would change it for other tests."""
    return Path(shutil.copytree(directory, into / directory.name))


@pytest.fixture(scope="module")
def hub_source(tmp_path_factory) -> Path:
    """A dense model laid out like a hub cache snapshot, with the source's own card (license MIT) and a
    tokenizer_config.json without `tokenizer_class`."""
    snapshot = tmp_path_factory.mktemp("hub") / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / "0123abcd"
    save_tiny_model(snapshot)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# tiny llama\n")
    config_file = snapshot / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.pop("tokenizer_class", None)
    config_file.write_text(json.dumps(tokenizer_config))
    return snapshot


@pytest.fixture(scope="module")
def hub_carved(tmp_path_factory, hub_source, train_text) -> Path:
    """A carve of `hub_source` that exports (linear-gate router under Qwen2-MoE's rule) and fine-tunes."""
    out = tmp_path_factory.mktemp("carved") / "tiny-S1A1E4"
    options = CarveOptions(MoEShape.parse("S1A1E4"), router="linear-gate", gating="softmax-renorm")
    run_carve(str(hub_source), out, options, Calibration(str(train_text), nsamples=2, seqlen=64, seed=0), compute=CPU)
    return out


def test_hub_ids_come_from_the_record_or_the_hub_cache_never_from_a_local_path():
    assert hub_model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_model_id("/cache/hub/models--Owner--Name-7B/snapshots/abc/model-Q8_0.gguf") == "Owner/Name-7B"
    assert hub_model_id("/home/me/models/llama") is None and hub_model_id(None) is None


def test_the_carved_card_parses_with_its_source_base_model_and_license(hub_carved):
    card = card_of(hub_carved)
    data = card.data
    assert data.base_model == HUB_ID and data.license == "mit"
    assert data.pipeline_tag == "text-generation" and data.library_name == "transformers"
    assert {"cmoe", "mixture-of-experts", "carved"} <= set(data.tags)
    assert data.datasets is None, "local calibration text is no hub dataset"
    assert "# S1A1E4 carved from cmoe-tests/tiny-llama" in card.text and "| router | linear-gate" in card.text
    assert str(hub_carved.parent) not in card.content, "no local path of the carver's disk on the card"
    assert read_recipe(hub_carved)["source_license"] == {"license": "mit"}


def test_a_local_source_without_a_card_gets_no_base_model_or_license(carved_dir):
    data = card_of(carved_dir).data
    assert data.base_model is None and data.license is None and data.pipeline_tag == "text-generation"


def test_hub_calibration_and_training_data_are_the_cards_datasets(carved_dir):
    record = read_recipe(carved_dir)
    record["calibration"] = {"source": "wikitext2", "repo_id": "Salesforce/wikitext", "split": "train"}
    record["finetune"] = {
        "data": [{"path": "/data/a.txt"}, {"source": "hf:roneneldan/TinyStories", "repo_id": "roneneldan/TinyStories"}]
    }
    assert card_data(record, "cmoe").datasets == ["Salesforce/wikitext", "roneneldan/TinyStories"]


def test_recording_the_same_task_replaces_it_and_another_task_is_appended(carved_dir, tmp_path):
    carved = copy_of(carved_dir, tmp_path)
    record_results(carved, [perplexity_entry(40.0)])
    record_results(carved, [perplexity_entry(38.5), PIQA])
    record_results(carved, [perplexity_entry(41.0, split="validation")])
    evaluations = read_recipe(carved)["evaluations"]
    assert [(entry["task"], entry["dataset"]["split"]) for entry in evaluations] == [
        ("perplexity", "test"),
        ("piqa", "validation"),
        ("perplexity", "validation"),
    ]
    assert evaluations[0]["metrics"] == [{"type": "perplexity", "value": 38.5}]
    assert evaluations[1]["metrics"][0] == {"type": "acc", "value": 0.625, "stderr": 0.01}
    card = card_of(carved)
    model_index = card.data.to_dict()["model-index"]
    assert model_index[0]["name"] == "tinystories-656k-S1A1E4" and len(model_index[0]["results"]) == 3
    assert results_of(carved) == {
        ("perplexity", "perplexity"): 41.0,
        ("piqa", "acc"): 0.625,
        ("piqa", "acc_norm"): 0.75,
    }
    assert "| piqa | piqa (baber/piqa, validation) | acc | 0.6250 ± 0.0100 | num_fewshot 0, limit 8 |" in card.text
    assert "| perplexity | wikitext2 (Salesforce/wikitext, test) | perplexity | 38.5000 |" in card.text
    assert "| configuration | S1A1E4" in card.text and "## Timings (seconds)" in card.text


def test_a_failed_write_leaves_recipe_and_card_as_they_were(carved_dir, tmp_path, monkeypatch):
    carved = copy_of(carved_dir, tmp_path)
    before = {name: (carved / name).read_bytes() for name in ("cmoe_recipe.yaml", "README.md")}
    write_text = Path.write_text

    def disk_full_on_the_card(path, *args, **kwargs):
        if path.name.startswith(".README.md"):
            raise OSError(28, "No space left on device")
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(recipe_file.Path, "write_text", disk_full_on_the_card)
    with pytest.raises(OSError, match="No space"):
        record_results(carved, [PIQA])
    monkeypatch.undo()
    assert {name: (carved / name).read_bytes() for name in before} == before
    assert not [path.name for path in carved.iterdir() if path.name.endswith(".tmp")]


def test_a_dense_directory_is_refused_in_one_line(tiny_model_dir):
    before = tree(tiny_model_dir)
    with pytest.raises(CmoeError, match="not a model directory written by cmoe") as error:
        record_results(tiny_model_dir, [PIQA])
    assert "\n" not in str(error.value) and tree(tiny_model_dir) == before


def test_the_card_of_an_exported_model_rebuilds_from_its_directory(hub_carved, tmp_path):
    exported = tmp_path / "exported"
    run_export(str(hub_carved), "qwen2-moe", exported)
    assert card_of(exported).data.base_model == HUB_ID and "qwen2_moe" in card_of(exported).data.tags
    record_results(exported, [PIQA])
    card = card_of(exported)
    assert card.data.license == "mit" and card.data.to_dict()["model-index"][0]["name"] == "tiny-llama-S1A1E4-qwen2-moe"
    assert "carved from cmoe-tests/tiny-llama, as qwen2-moe" in card.text and "no custom code" in card.text
    assert results_of(exported)[("piqa", "acc")] == 0.625


def test_the_card_of_a_fine_tuned_model_rebuilds_from_its_directory(hub_carved, train_text, tmp_path):
    tuned = tmp_path / "tuned"
    options = FinetuneOptions(nsamples=4, seqlen=64, batch_size=2, checkpoint_every=0, eval_windows=2)
    run_finetune(str(hub_carved), [str(train_text)], tuned, options, device="cpu")
    assert "## Fine-tuning" in card_of(tuned).text
    record_results(tuned, [perplexity_entry(30.0)])
    card = card_of(tuned)
    assert (
        card.data.base_model == HUB_ID
        and card.data.to_dict()["model-index"][0]["name"] == "tiny-llama-S1A1E4-finetuned"
    )
    assert "## Fine-tuning" in card.text and "| configuration | S1A1E4" in card.text
    assert results_of(tuned) == {("perplexity", "perplexity"): 30.0}


def test_a_card_rebuilt_from_config_json_equals_the_one_written_at_save(carved_dir):
    config = json.loads((carved_dir / "config.json").read_text())
    assert str(build_card(read_recipe(carved_dir), config)) == (carved_dir / "README.md").read_text()


def test_eval_perplexity_records_into_a_cmoe_directory_and_replaces_its_entry(capsys, carved_dir, tmp_path):
    carved = copy_of(carved_dir, tmp_path)
    args = ["eval", "perplexity", str(carved), "--data", VALID, "--max-windows", "2", "--device", "cpu", "--json"]
    values = []
    for seqlen in ("64", "32"):
        code, out, err = run(capsys, *args, "--seqlen", seqlen)
        assert code == 0, err
        result = json.loads(out)
        assert result["recorded_in"] == str(carved.resolve())
        values.append(result["perplexity"])
    (entry,) = read_recipe(carved)["evaluations"]
    assert entry["task"] == "perplexity" and entry["dataset"] == {"name": TINYSTORIES_VALID.name, "type": "text"}
    assert entry["metrics"][0]["value"] == values[1] != values[0] and entry["protocol"]["seqlen"] == 32
    assert entry["protocol"]["windows"] == 2 and entry["protocol"]["versions"]["torch"]
    assert results_of(carved) == {("perplexity", "perplexity"): values[1]}
    before = (carved / "cmoe_recipe.yaml").read_bytes()
    code, out, _ = run(capsys, *args, "--seqlen", "64", "--no-record")
    assert code == 0 and "recorded_in" not in json.loads(out)
    assert (carved / "cmoe_recipe.yaml").read_bytes() == before


def test_eval_perplexity_record_on_a_dense_model_is_refused_and_its_default_records_nothing(capsys, tiny_model_dir):
    before = tree(tiny_model_dir)
    args = ["eval", "perplexity", str(tiny_model_dir), "--data", VALID, "--seqlen", "64", "--max-windows", "1"]
    assert_one_line_error(capsys, [*args, "--record"], "not a model directory written by cmoe")
    code, out, _ = run(capsys, *args, "--device", "cpu")
    assert code == 0 and "recorded" not in out and tree(tiny_model_dir) == before


def test_a_cmoe_model_in_the_hub_cache_is_not_written_into(capsys, carved_dir, tmp_path):
    snapshot = tmp_path / "models--someone--tiny" / "snapshots" / "abc"
    shutil.copytree(carved_dir, snapshot)
    before = tree(tmp_path)
    args = ["eval", "perplexity", str(snapshot), "--data", VALID, "--seqlen", "64", "--max-windows", "1"]
    assert_one_line_error(capsys, [*args, "--record"], "a hub cache snapshot")
    code, out, err = run(capsys, *args, "--device", "cpu")
    assert code == 0 and "recorded" not in out and "note: the result is not recorded" in err
    assert tree(tmp_path) == before


def test_save_pretrained_writes_auto_map_and_self_contained_code(carved_dir, tmp_path):
    cmoe.load_carved(carved_dir).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cmoe.CMoEConfig",
        "AutoModelForCausalLM": "modeling_cmoe.CMoEForCausalLM",
    }
    package = Path(cmoe.__file__).parent / "modeling"
    for name in ("configuration_cmoe.py", "modeling_cmoe.py"):
        assert (tmp_path / "saved" / name).read_text() == (package / name).read_text()


@pytest.mark.slow
def test_the_tokenizer_loads_without_cmoe_without_remote_code_or_an_answer(hub_source, hub_carved, tmp_path):
    assert "tokenizer_class" not in json.loads((hub_source / "tokenizer_config.json").read_text())
    saved_class = json.loads((hub_carved / "tokenizer_config.json").read_text())["tokenizer_class"]
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["cmoe"] = None  # any `import cmoe` fails
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(hub_carved)!r})
        print(json.dumps([type(tokenizer).__name__, tokenizer("Once upon a time, a cat").input_ids]))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    name, ids = json.loads(done.stdout.strip().splitlines()[-1].split("[y/N] ")[-1])
    assert name == saved_class and ids == AutoTokenizer.from_pretrained(hub_source)("Once upon a time, a cat").input_ids
    assert not (tmp_path / "modules").exists(), "no remote code was imported"


@pytest.fixture
def hub_calls(monkeypatch) -> list:
    """HfApi's repository, branch and upload calls, recorded and answered locally."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return SimpleNamespace(oid="c0ffee", commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/c0ffee")

    for name, method in (
        ("create_repo", create_repo),
        ("create_branch", create_branch),
        ("upload_folder", upload_folder),
    ):
        monkeypatch.setattr(huggingface_hub.HfApi, name, method)
    return calls


def test_push_uploads_the_artifact_without_its_locks_and_temporaries(capsys, carved_dir, tmp_path, hub_calls):
    carved = copy_of(carved_dir, tmp_path)
    (carved / ".README.md.123.tmp").write_text("half a card")
    (carved / "upload.lock").write_text("")
    args = ["push", str(carved), "someone/tiny-S1A1E4", "--private", "--revision", "carves", "--commit-message", "hi"]
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    assert json.loads(out)["commit_url"] == "https://huggingface.co/someone/tiny-S1A1E4/commit/c0ffee"
    (_, repo, created), (_, _, branch), (_, _, upload) = hub_calls
    assert repo == "someone/tiny-S1A1E4" and created == {"repo_type": "model", "private": True, "exist_ok": True}
    assert branch == {"branch": "carves", "repo_type": "model", "exist_ok": True}
    assert upload["folder_path"] == carved and upload["revision"] == "carves" and upload["commit_message"] == "hi"
    files = [path.relative_to(carved).as_posix() for path in carved.rglob("*") if path.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert uploaded == set(files) - {".README.md.123.tmp", "upload.lock"}
    assert {"README.md", "cmoe_recipe.yaml", "config.json", "modeling_cmoe.py", "tokenizer.json"} <= uploaded
    assert upload["ignore_patterns"] == UPLOAD_IGNORE


def partial_carve(carved_dir: Path, tmp_path: Path) -> str:
    return str(shutil.copytree(carved_dir, tmp_path / ".tiny.partial"))


def resumable_carve(carved_dir: Path, tmp_path: Path) -> str:
    copy = shutil.copytree(carved_dir, tmp_path / "resumable")
    (copy / ".resume").mkdir()
    return str(copy)


@pytest.mark.parametrize(
    "directory, repo_id, expected",
    [
        (lambda carved, tmp: str(tmp / "missing"), "someone/model", "no such model directory"),
        (lambda carved, tmp: str(save_tiny_model(tmp / "dense")), "someone/model", "not a model directory written"),
        (partial_carve, "someone/model", "a partial output"),
        (resumable_carve, "someone/model", "a partial output"),
        (lambda carved, tmp: str(carved), "not/a/repo", "not a hub repository id"),
        (lambda carved, tmp: str(carved), "someone/bad--name", "not a hub repository id"),
    ],
)
def test_push_refuses_before_any_request(capsys, carved_dir, tmp_path, hub_calls, directory, repo_id, expected):
    assert_one_line_error(capsys, ["push", directory(carved_dir, tmp_path), repo_id], expected)
    assert hub_calls == []
