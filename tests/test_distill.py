"""`cmoe finetune --distill`: a carve that computes the dense function has zero KL to its teacher, training
on the KL lowers it, runs are deterministic, the options replay, and bad values fail in one line."""

import shutil
from dataclasses import replace

import pytest
import torch
from conftest import TINYSTORIES_MODEL, tiny_llama, weight_bytes
from test_cli import assert_one_line_error, run, tree

from cmoe import Calibration, CarveOptions, Compute, MoEShape, run_carve
from cmoe.finetune import FinetuneOptions, FinetuneRecipe, parse_data_spec, run_finetune
from cmoe.finetune.trainer import FinetuneRun
from cmoe.io.loading import load_pretrained
from cmoe.io.model_card import CARD_FILE
from cmoe.io.recipe_file import RECIPE_FILE, read_recipe, write_recipe
from cmoe.numerics.training import distillation_kl

FAST = FinetuneOptions(nsamples=4, seqlen=64, batch_size=2, checkpoint_every=0, distill=1.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_is_zero_for_equal_logits_and_follows_the_temperature():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    assert distillation_kl(teacher, teacher.clone(), 1.0).item() == pytest.approx(0, abs=1e-7)
    per_token = torch.nn.functional.kl_div(
        torch.log_softmax(student[:, :-1] / 2, -1),
        torch.log_softmax(teacher[:, :-1] / 2, -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    by_hand = per_token.mean() * 4  # T^2
    assert distillation_kl(student, teacher, 2.0).item() == pytest.approx(by_hand.item(), rel=1e-5)
    changed_last = teacher.clone()
    changed_last[:, -1] += 5  # the last position predicts nothing
    assert distillation_kl(student, changed_last, 2.0) == distillation_kl(student, teacher, 2.0)


def test_a_carve_with_every_expert_active_starts_at_zero_kl_and_the_teachers_loss(train_text, tmp_path):
    carved = tmp_path / "S1A3E4"
    run_carve(
        str(TINYSTORIES_MODEL),
        carved,
        CarveOptions(MoEShape.parse("S1A3E4")),
        Calibration(str(train_text), nsamples=2, seqlen=64, seed=0),
        compute=Compute("cpu", "float32", 2),
    )
    recipe = FinetuneRecipe(str(carved), (parse_data_spec(str(train_text)),), replace(FAST, nsamples=2), device="cpu")
    training = FinetuneRun(recipe, tmp_path / "tuned")
    first = training.run()["finetune"]["loss_curve"][0]
    assert first["distill_loss"] < 1e-4, first
    batch = training.data.windows(training.state.mixture_weights, 0, FAST.batch_size)
    dense, _ = load_pretrained(str(TINYSTORIES_MODEL))
    with torch.no_grad():
        teacher_loss = dense(input_ids=batch, labels=batch).loss.item()
    assert first["loss"] == pytest.approx(teacher_loss, abs=1e-5)


def test_training_on_the_kl_lowers_it(carved_dir, train_text, tmp_path):
    """Eight epochs of the same two windows: the first and last steps see the same text, so the drop is the
    training's (without the KL's gradient the curve stays within 5% of where it starts)."""
    options = replace(FAST, nsamples=2, epochs=8, lr=5e-3)
    record = run_finetune(str(carved_dir), [str(train_text)], tmp_path / "tuned", options, device="cpu")["finetune"]
    curve = record["loss_curve"]
    assert len(curve) == 8 and all(point["distill_loss"] > 0 for point in curve)
    assert curve[-1]["distill_loss"] < 0.5 * curve[0]["distill_loss"], curve
    assert record["teacher"] == str(TINYSTORIES_MODEL.resolve())
    assert record["recipe"]["reference"] == str(TINYSTORIES_MODEL.resolve())


def test_distilled_runs_are_deterministic_and_differ_from_plain_ones(carved_dir, train_text, tmp_path):
    options = replace(FAST, distill=0.5, distill_temperature=2.0, lr=2e-3)
    outputs = []
    for name, run_options in (("a", options), ("b", options), ("plain", replace(options, distill=0.0))):
        outputs.append(tmp_path / name)
        record = run_finetune(str(carved_dir), [str(train_text)], outputs[-1], run_options, device="cpu")
    assert weight_bytes(outputs[0]) == weight_bytes(outputs[1])
    assert weight_bytes(outputs[0]) != weight_bytes(outputs[2])
    assert all("distill_loss" not in point for point in record["finetune"]["loss_curve"])
    assert record["finetune"]["teacher"] is None


def test_the_saved_recipe_replays_the_distillation(capsys, tmp_path, carved_dir, train_text):
    first = tmp_path / "first"
    common = ["--nsamples", "2", "--seqlen", "64", "--checkpoint-every", "0", "--device", "cpu"]
    distill = ["--distill", "0.5", "--distill-temperature", "2"]
    code, _, err = run(
        capsys, "finetune", str(carved_dir), "--data", str(train_text), "-o", str(first), *distill, *common
    )
    assert code == 0, err
    code, _, err = run(capsys, "finetune", "--recipe", str(first), "-o", str(tmp_path / "replayed"))
    assert code == 0, err
    replayed = read_recipe(tmp_path / "replayed")["finetune"]
    assert replayed["recipe"]["options"]["distill"] == 0.5 and replayed["recipe"]["options"]["distill_temperature"] == 2
    assert replayed["recipe"] == read_recipe(first)["finetune"]["recipe"]
    assert FinetuneRecipe.from_dict(replayed["recipe"]).options.distill == 0.5
    assert "distill_loss" in replayed["loss_curve"][0]
    assert weight_bytes(tmp_path / "replayed") == weight_bytes(first)
    assert "distilled from the dense" in (first / CARD_FILE).read_text()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--distill", "1.5"], "--distill 1.5: must be in [0, 1]"),
        (["--distill", "-0.1"], "--distill -0.1: must be in [0, 1]"),
        (["--distill", "1", "--distill-temperature", "0"], "--distill-temperature 0.0: must be positive"),
        (["--distill", "1", "--reference", "{small}"], "has a vocabulary of 97 tokens, the carved model 2048"),
        (["--distill", "1", "--reference", "{carved}"], "expected the dense model, got a carved one"),
    ],
)
def test_bad_distillation_options_fail_in_one_line(capsys, tmp_path, carved_dir, train_text, args, expected):
    small = tmp_path / "small"
    tiny_llama().save_pretrained(small)
    fill = {"small": str(small), "carved": str(carved_dir)}
    command = ["finetune", str(carved_dir), "--data", str(train_text), "--seqlen", "64", "--device", "cpu"]
    command += [*[arg.format(**fill) for arg in args], "-o", str(tmp_path / "out")]
    before = tree(tmp_path)
    assert_one_line_error(capsys, command, expected)
    assert tree(tmp_path) == before


def test_distilling_a_carve_whose_source_is_gone_is_refused_before_training(capsys, tmp_path, carved_dir, train_text):
    orphan = tmp_path / "orphan"
    shutil.copytree(carved_dir, orphan)
    write_recipe(orphan, {**read_recipe(orphan / RECIPE_FILE), "source_model": str(tmp_path / "gone")})
    command = [
        "finetune",
        str(orphan),
        "--data",
        str(train_text),
        "--seqlen",
        "64",
        "--device",
        "cpu",
        "--distill",
        "1",
    ]
    before = tree(tmp_path)
    assert_one_line_error(capsys, [*command, "-o", str(tmp_path / "out")], "--distill needs the dense model")
    assert tree(tmp_path) == before
