"""`cmoe eval tasks` on lm-evaluation-harness, offline: a local multiple-choice task (the true ending of a
TinyStories sentence against another sentence's ending) made from the fixture text."""

import json
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from cmoe import Calibration, CarveOptions, Compute, MoEShape, run_carve
from cmoe.errors import CmoeError
from cmoe.eval.tasks import TaskOptions, run_tasks
from cmoe.export import run_export
from cmoe.io.recipe_file import read_recipe

from conftest import TINYSTORIES_MODEL, TINYSTORIES_VALID
from test_cli import assert_one_line_error, run

pytest.importorskip("lm_eval")
TASK = "story_ending"
CPU = Compute("cpu", "float32", 4)


@pytest.fixture(scope="session")
def story_task(tmp_path_factory):
    """A folder with one lm-eval task YAML and its 24 documents (JSON lines)."""
    folder = tmp_path_factory.mktemp("tasks")
    text = TINYSTORIES_VALID.read_text(encoding="utf-8")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 30 < len(s.strip()) < 200]
    with (folder / "stories.jsonl").open("w") as handle:
        for index in range(24):
            words, other = sentences[index].split(), sentences[(index * 7 + 13) % len(sentences)].split()
            ending, wrong = " ".join(words[len(words) // 2 :]), " ".join(other[len(other) // 2 :])
            choices, label = ([ending, wrong], 0) if index % 2 else ([wrong, ending], 1)
            handle.write(
                json.dumps({"context": " ".join(words[: len(words) // 2]), "choices": choices, "label": label})
            )
            handle.write("\n")
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "stories.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(task))
    return folder


def hand_accuracy(model_dir, documents_file) -> float:
    """The task's accuracy computed directly, by lm-eval's rule for multiple choice: the choice with the
    highest summed log-probability of its tokens (the joined text's tokens after the context's length),
    scored after the context's own tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    correct = []
    for line in documents_file.read_text().splitlines():
        document = json.loads(line)
        context = tokenizer(document["context"]).input_ids
        scores = []
        for choice in document["choices"]:
            sequence = context + tokenizer(document["context"] + " " + choice).input_ids[len(context) :]
            with torch.no_grad():
                logprobs = model(torch.tensor([sequence])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[at - 1, sequence[at]].item() for at in range(len(context), len(sequence))))
        correct.append(max(range(len(scores)), key=scores.__getitem__) == document["label"])
    return sum(correct) / len(correct)


def test_dense_accuracy_is_the_models_own(story_task):
    result = run_tasks(str(TINYSTORIES_MODEL), TaskOptions((TASK,), include_path=story_task), CPU)
    scores = result["tasks"][TASK]
    assert scores["samples"] == 24 and scores["num_fewshot"] == 0
    assert scores["metrics"]["acc"] == pytest.approx(hand_accuracy(TINYSTORIES_MODEL, story_task / "stories.jsonl"))
    assert set(scores["metrics"]) == {"acc", "acc_norm"} and scores["stderr"]["acc"] > 0
    assert "recorded_in" not in result, "a model cmoe did not write is not recorded into"


def test_every_expert_active_scores_as_the_dense_model(story_task, tmp_path, train_text):
    carved = tmp_path / "all-active"
    run_carve(
        str(TINYSTORIES_MODEL),
        carved,
        CarveOptions(MoEShape.parse("S1A3E4")),
        Calibration(str(train_text), nsamples=2, seqlen=64, seed=0),
        compute=CPU,
    )
    options = TaskOptions((TASK,), include_path=story_task)
    dense = run_tasks(str(TINYSTORIES_MODEL), options, CPU)["tasks"][TASK]["metrics"]
    assert run_tasks(str(carved), options, CPU, record=False)["tasks"][TASK]["metrics"] == pytest.approx(dense)
    assert "evaluations" not in read_recipe(carved), "--no-record writes nothing"


def test_carved_and_exported_scores_are_recorded_in_the_model(capsys, story_task, tmp_path, train_text):
    carved, exported = tmp_path / "carved", tmp_path / "qwen2"
    options = CarveOptions(MoEShape.parse("S1A1E4"), router="linear-gate", gating="softmax-renorm")
    run_carve(str(TINYSTORIES_MODEL), carved, options, Calibration(str(train_text), 2, 64, 0), compute=CPU)
    run_export(str(carved), "qwen2-moe", exported)
    for model in (carved, exported):
        code, out, err = run(
            capsys,
            "eval",
            "tasks",
            str(model),
            "--tasks",
            TASK,
            "--include-path",
            str(story_task),
            "--limit",
            "8",
            "--device",
            "cpu",
            "--json",
        )
        assert code == 0, err
        report = json.loads(out)
        assert report["tasks"][TASK]["samples"] == 8 and report["recorded_in"] == str(model.resolve())
        saved = [entry for entry in read_recipe(model)["evaluations"] if entry["task"] == TASK]
        assert len(saved) == 1 and saved[0]["metrics"][0]["value"] == report["tasks"][TASK]["metrics"]["acc"]
        assert TASK in (model / "README.md").read_text()


@pytest.mark.parametrize(
    "arguments, message",
    [
        pytest.param(["--tasks", "no_such_task_xyz"], "unknown task no_such_task_xyz", marks=pytest.mark.slow),
        (["--tasks", " , "], "give at least one task"),
        (["--limit", "0"], "--limit 0"),
        (["--limit", "1.5"], "--limit 1.5"),
        (["--num-fewshot", "-1"], "--num-fewshot -1"),
        (["--include-path", "no/such/folder"], "no such directory"),
        (["--record"], "not a model directory written by cmoe"),
    ],
)
def test_bad_inputs_exit_2_in_one_line(capsys, story_task, arguments, message):
    if "--include-path" not in arguments:
        arguments = [*arguments, "--include-path", str(story_task)]
    if "--tasks" not in arguments:
        arguments = [*arguments, "--tasks", TASK]
    assert_one_line_error(capsys, ["eval", "tasks", str(TINYSTORIES_MODEL), *arguments, "--device", "cpu"], message)


def test_without_lm_eval_the_install_line_is_given(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    with pytest.raises(CmoeError, match=r'pip install "cmoe\[eval\]"'):
        run_tasks(str(TINYSTORIES_MODEL), TaskOptions(("piqa",)), CPU)
