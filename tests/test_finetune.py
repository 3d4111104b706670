"""`cmoe finetune`: training lowers the loss, u and b train and persist, resume is exact, a saved recipe
replays to the same bytes, mixtures sample as asked, and bad inputs fail in one line."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINYSTORIES_MODEL, TINYSTORIES_VALID, weight_bytes, weights_of
from test_cli import assert_one_line_error, run, tree
from transformers import AutoTokenizer

import cmoe
from cmoe import Calibration, CarveOptions, CmoeError, Compute, MoEShape, run_carve
from cmoe.calibration import evaluation_windows, load_text, tokenize_text
from cmoe.finetune import (
    MIXTURES,
    DataSpec,
    FinetuneOptions,
    FinetuneRecipe,
    RoutingMeter,
    build_finetune_recipe,
    parse_data_spec,
    run_finetune,
)
from cmoe.finetune.checkpoints import PROGRESS_FILE, checkpoint_root
from cmoe.finetune.evaluation import windows_nll
from cmoe.io.recipe_file import RECIPE_FILE, read_recipe
from cmoe.numerics.mixture import draw_sample, dynamic_weights
from cmoe.numerics.training import balancing_direction, planned_steps, sample_position

FAST = FinetuneOptions(nsamples=12, seqlen=64, batch_size=2, checkpoint_every=0, eval_windows=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def finetune(carved_dir, out, data, options=FAST, **kwargs) -> dict:
    return run_finetune(str(carved_dir), [str(item) for item in data], out, options, device="cpu", **kwargs)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return weights_of(path)


def router_tensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in weights(path).items() if name.endswith(f"router.{kind}")}


def test_training_lowers_the_loss_trains_u_and_b_and_reloads_identically(carved_dir, train_text, tmp_path):
    out = tmp_path / "tuned"
    options = replace(FAST, nsamples=24, lr=2e-3, eval_every=6)
    recipe = finetune(carved_dir, out, [train_text], options, eval_data=str(train_text))["finetune"]
    curve = recipe["eval_curve"]
    assert [point["step"] for point in curve] == [0, 6, 12] and recipe["steps"] == 12 == len(recipe["loss_curve"])
    assert curve[-1]["mean_nll"] < curve[0]["mean_nll"] - 0.05, curve

    before, after = router_tensors(carved_dir, "scale"), router_tensors(out, "scale")
    assert len(after) == 2 and all(not torch.equal(after[name], before[name]) for name in after)
    biases = router_tensors(out, "bias")
    assert any(tensor.abs().sum() > 0 for tensor in biases.values())  # flat router softmax: b oscillates by +-1e-3
    assert len(recipe["routing_load_before"]) == len(recipe["routing_load_after"]) == 2
    assert all(abs(sum(layer) - 1) < 1e-4 for layer in recipe["routing_load_after"])
    saved = read_recipe(out)
    assert saved["config"] == "S1A1E4" and saved["finetune"]["options"]["lora_r"] == 8
    replayable = saved["finetune"]["recipe"]
    assert replayable["model"] == str(carved_dir.resolve())
    assert replayable["data"] == [{"source": str(train_text.resolve()), "weight": 1.0}]
    assert FinetuneRecipe.from_dict(replayable).options == options
    assert not any(name.endswith(("lora_A.weight", "lora_B.weight")) for name in weights(out))

    model = cmoe.load_carved(out)
    tokens = tokenize_text(load_text(str(train_text)).text, AutoTokenizer.from_pretrained(out))
    windows = evaluation_windows(tokens, 64, 4)
    assert windows_nll(model, windows, FAST.batch_size, torch.device("cpu")) == curve[-1]["mean_nll"]
    assert all("balance_loss" not in point for point in recipe["loss_curve"])


def test_full_fine_tuning_with_frozen_router_keeps_u(carved_dir, train_text, tmp_path):
    out = tmp_path / "full"
    options = replace(FAST, nsamples=4, full=True, train_router=False, grad_checkpointing=True, lr=1e-3)
    finetune(carved_dir, out, [train_text], options)
    before, after = weights(carved_dir), weights(out)
    assert all(torch.equal(after[name], before[name]) for name in after if name.endswith("router.scale"))
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[query], before[query])


def test_lora_run_trains_a_noisy_topk_gate_with_its_balance_loss(train_text, tmp_path):
    carved = tmp_path / "noisy"
    run_carve(
        str(TINYSTORIES_MODEL),
        carved,
        CarveOptions(MoEShape.parse("S1A1E4"), router="noisy-topk"),
        Calibration(str(train_text), nsamples=2, seqlen=64, seed=0),
        compute=Compute("cpu", "float32", 2),
    )
    recipe = finetune(carved, tmp_path / "tuned", [train_text], replace(FAST, nsamples=4))["finetune"]
    assert all(point["balance_loss"] > 0 for point in recipe["loss_curve"]) and len(recipe["loss_curve"]) == 2
    before, after = router_tensors(carved, "gate.weight"), router_tensors(tmp_path / "tuned", "gate.weight")
    assert len(after) == 2 and all(not torch.equal(after[name], before[name]) for name in after)


def test_a_carve_of_a_gguf_model_fine_tunes_and_saves(carved_dir, train_text, tmp_path):
    """A carve of a GGUF file inherits the GGUF `quantization_config`; the carved weights are plain, so
    fine-tuning must load and save them as such (transformers refuses to save a GGUF-quantized model)."""
    from_gguf = tmp_path / "from-gguf"
    shutil.copytree(carved_dir, from_gguf)
    config = json.loads((from_gguf / "config.json").read_text())
    quantization = {"dequantize": False, "gguf_file": "model.gguf", "quant_method": "gguf"}
    config["text_config"]["quantization_config"] = quantization
    (from_gguf / "config.json").write_text(json.dumps(config))
    finetune(from_gguf, tmp_path / "tuned", [train_text], replace(FAST, nsamples=2))
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert "quantization_config" not in saved["text_config"]
    assert getattr(cmoe.load_carved(tmp_path / "tuned"), "hf_quantizer", None) is None


def test_resume_after_a_crash_and_a_stop_equals_an_uninterrupted_run(carved_dir, train_text, tmp_path):
    data = [f"{train_text}:0.7", f"{TINYSTORIES_VALID}:0.3"]
    options = replace(FAST, checkpoint_every=2)
    whole = finetune(carved_dir, tmp_path / "whole", data, options)["finetune"]

    out = tmp_path / "pieces"

    def crash_at_step_3(report):
        if report.step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(carved_dir, out, data, options, on_step=crash_at_step_3)
    assert not out.exists() and [p.name for p in checkpoint_root(out).iterdir()] == ["step-000002"]
    progress = json.loads((checkpoint_root(out) / "step-000002" / PROGRESS_FILE).read_text())
    assert progress == {"resume_key": options.resume_key(), "step": 2}
    stopped = finetune(carved_dir, out, data, replace(options, max_steps=4), resume=True)["finetune"]
    assert stopped["steps"] == 4 and stopped["resumed_from_step"] == 2
    assert (checkpoint_root(out) / "step-000004").is_dir()
    resumed = finetune(carved_dir, out, data, options, resume=True, overwrite=True)["finetune"]
    assert not checkpoint_root(out).exists()

    assert resumed["loss_curve"] == whole["loss_curve"] and resumed["steps"] == planned_steps(12, 1, 2)
    expected, got = weights(tmp_path / "whole"), weights(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)


def test_static_mixture_samples_domains_in_the_asked_proportions():
    draws = [draw_sample(0, index, [0.7, 0.3], [5000, 800], 64) for index in range(20000)]
    share = sum(domain == 0 for domain, _ in draws) / len(draws)
    assert abs(share - 0.7) < 0.015
    assert all(0 <= start <= (5000 if domain == 0 else 800) - 64 for domain, start in draws)
    assert draws[:50] == [draw_sample(0, index, [0.7, 0.3], [5000, 800], 64) for index in range(50)]
    assert sorted(sample_position(3, index, 10) for index in range(10, 20)) == list(range(10))


def test_dynamic_mixture_moves_weight_toward_the_larger_loss_gap():
    weights = dynamic_weights([0.5, 0.5], losses=[3.0, 2.5], reference_losses=[2.0, 2.4])
    assert weights[0] > 0.7 and abs(sum(weights) - 1) < 1e-9
    assert dynamic_weights([0.6, 0.4], [2.0, 1.0], [2.5, 1.5]) == pytest.approx([0.6, 0.4], abs=1e-4)
    assert dynamic_weights([0.5, 0.5], [5.0, 1.0], [1.0, 1.0])[1] > 0


def test_dynamic_mixture_run_logs_weights_over_time(carved_dir, train_text, tmp_path):
    options = replace(FAST, nsamples=8, mixture="dynamic", mixture_every=2, heldout_windows=2)
    mixture = finetune(carved_dir, tmp_path / "dyn", [train_text, TINYSTORIES_VALID], options)["finetune"]["mixture"]
    history = mixture["weights_over_time"]
    assert [entry["step"] for entry in history] == [0, 2]
    assert mixture["reference_model"] == str(TINYSTORIES_MODEL.resolve())
    gaps = [loss - reference for loss, reference in zip(history[1]["losses"], mixture["reference_losses"])]
    larger = max(range(2), key=lambda domain: gaps[domain])
    assert history[1]["weights"][larger] > 0.5 and abs(sum(history[1]["weights"]) - 1) < 1e-9


def test_balancing_direction_lowers_busy_experts_and_raises_idle_ones():
    assert balancing_direction(torch.tensor([10, 2, 3, 5])).tolist() == [-1.0, 1.0, 1.0, 0.0]
    assert balancing_direction(torch.tensor([7, 7])).tolist() == [0.0, 0.0]


def test_meter_sums_the_balance_loss_of_routers_that_define_one(carved_dir):
    model = cmoe.load_carved(carved_dir)
    routers = [layer.mlp.router for layer in model.model.layers]

    def set_balance_loss(module, args, routing):
        module.balance_loss = routing.probs.mean() * 0 + 1.5

    routers[0].register_forward_hook(set_balance_loss)
    meter = RoutingMeter(model)
    meter.active = True
    model(torch.randint(0, 2000, (1, 16)))
    assert meter.take_balance_loss().item() == 1.5 and meter.take_balance_loss() is None
    assert [int(counts.sum()) for counts in meter.take_counts()] == [16, 16]


def test_data_specs_take_the_weight_after_the_last_colon():
    assert parse_data_spec("a.jsonl:0.7") == DataSpec("a.jsonl", 0.7)
    assert parse_data_spec("b.txt") == DataSpec("b.txt", 1.0)
    assert parse_data_spec("dir:x/b.txt") == DataSpec("dir:x/b.txt", 1.0)
    assert parse_data_spec("dir:x/b.txt:2") == DataSpec("dir:x/b.txt", 2.0)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["{dense}", "--data", "{train}"], "not a carved model"),
        (["{carved}", "--data", "{train}:-1", "--data", "{valid}:2"], "must not be negative"),
        (["{carved}", "--data", "{train}:0", "--data", "{valid}:0"], "sum to a positive number"),
        (["{carved}", "--data", "{tmp}/short.txt"], "fewer than one window of 64"),
        (["{carved}", "--data", "{train}", "-o", "{tmp}"], "already exists"),
        (["{carved}", "--data", "{train}", "--resume"], "no checkpoint"),
        (["{carved}", "--data", "{train}", "--mixture", "greedy"], "--mixture greedy: expected one of static, dynamic"),
        (["--data", "{train}"], "give the carved MODEL"),
        (["{carved}"], "no training data"),
        (["--recipe", "{carved}"], "no fine-tuning recipe"),
        (["{carved}", "--data", "{train}", "--lr", "0"], "--lr 0.0: must be positive"),
        (["{carved}", "--data", "{train}", "--seqlen", "4096"], "maximum of 512"),
    ],
)
def test_bad_inputs_fail_in_one_line(capsys, tmp_path, carved_dir, train_text, args, expected):
    (tmp_path / "short.txt").write_text("Once upon a time.")
    fill = {
        "dense": str(TINYSTORIES_MODEL),
        "carved": str(carved_dir),
        "train": str(train_text),
        "valid": str(TINYSTORIES_VALID),
        "tmp": str(tmp_path),
    }
    command = ["finetune", "--seqlen", "64", "--device", "cpu", *[arg.format(**fill) for arg in args]]
    if "-o" not in command:
        command += ["-o", str(tmp_path / "out")]
    before = tree(tmp_path)
    assert_one_line_error(capsys, command, expected)
    assert tree(tmp_path) == before


def test_cli_finetune_stops_at_max_steps_and_keeps_a_checkpoint(capsys, tmp_path, carved_dir, train_text):
    out = tmp_path / "tuned"
    code, _, err = run(
        capsys,
        "finetune",
        str(carved_dir),
        "--data",
        str(train_text),
        "-o",
        str(out),
        "--nsamples",
        "8",
        "--seqlen",
        "64",
        "--max-steps",
        "2",
        "--eval-data",
        str(TINYSTORIES_VALID),
        "--eval-windows",
        "2",
        "--device",
        "cpu",
    )
    assert code == 0 and "wrote" in err and "2 steps" in err and "perplexity" in err, err
    assert (checkpoint_root(out) / "step-000002").is_dir() and (out / "model.safetensors.index.json").is_file()
    changed = [
        "finetune",
        str(carved_dir),
        "--data",
        str(train_text),
        "-o",
        str(out),
        "--nsamples",
        "8",
        "--seqlen",
        "64",
        "--lr",
        "1e-3",
        "--resume",
        "--overwrite",
        "--device",
        "cpu",
    ]
    assert_one_line_error(capsys, changed, "different options (lr)")
    code, out_text, _ = run(capsys, "finetune", "--help")
    for option in (
        "--data",
        "--recipe",
        "--mixture",
        "--resume",
        "--max-steps",
        "--bias-speed",
        "--full",
        "--freeze-router",
        *MIXTURES,
    ):
        assert option in out_text


def test_replaying_the_saved_recipe_gives_the_same_bytes_and_explicit_options_override_it(
    capsys, tmp_path, monkeypatch, carved_dir, train_text
):
    """The first run names its inputs by relative paths; the replay runs from another directory, so it only
    works because the saved recipe holds them as absolute paths."""
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(train_text, first / "train.txt")
    shutil.copytree(carved_dir, first / "carved")
    monkeypatch.chdir(first)
    code, _, err = run(
        capsys,
        "finetune",
        "carved",
        "--data",
        "train.txt:2",
        "-o",
        "tuned",
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--lr",
        "2e-3",
        "--checkpoint-every",
        "0",
        "--device",
        "cpu",
    )
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "finetune", "--recipe", f"first/tuned/{RECIPE_FILE}", "-o", "replayed")
    assert code == 0, err
    assert weight_bytes(tmp_path / "replayed") == weight_bytes(first / "tuned")
    replayed = read_recipe(tmp_path / "replayed")["finetune"]["recipe"]
    assert replayed == read_recipe(first / "tuned")["finetune"]["recipe"]
    assert replayed["data"] == [{"source": str(first / "train.txt"), "weight": 2.0}]

    code, _, err = run(capsys, "finetune", "--recipe", "first/tuned", "-o", "faster", "--lr", "1e-2", "--seed", "1")
    assert code == 0, err
    faster = read_recipe(tmp_path / "faster")["finetune"]["recipe"]
    assert faster["options"] == {**replayed["options"], "lr": 1e-2, "seed": 1}
    assert weight_bytes(tmp_path / "faster") != weight_bytes(first / "tuned")


def test_recipes_merge_explicit_values_over_the_file_and_refuse_what_they_do_not_know(tmp_path, carved_dir):
    recipe = build_finetune_recipe(str(carved_dir), options={"lr": 1e-3, "seed": None}, data=["a.txt:0.5", "b.txt"])
    assert recipe.options == FinetuneOptions(lr=1e-3) and recipe.data == (DataSpec("a.txt", 0.5), DataSpec("b.txt"))
    assert FinetuneRecipe.from_dict(recipe.to_dict()) == recipe
    saved = tmp_path / RECIPE_FILE
    saved.write_text(json.dumps({"finetune": {"recipe": recipe.to_dict()}}))  # JSON is YAML
    replayed = build_finetune_recipe(replay=saved, options={"epochs": 2, "lr": None}, device="cpu")
    assert replayed == replace(recipe, options=replace(recipe.options, epochs=2), device="cpu")
    assert build_finetune_recipe(replay=saved, data=["c.txt"]).data == (DataSpec("c.txt"),)
    with pytest.raises(CmoeError, match="unknown keys warmup"):
        FinetuneRecipe.from_dict({**recipe.to_dict(), "options": {"warmup": 10}})
    with pytest.raises(CmoeError, match="unknown keys warmup"):
        build_finetune_recipe(str(carved_dir), options={"warmup": 10}, data=["a.txt"])
    with pytest.raises(CmoeError, match="expected `kind: finetune`"):
        FinetuneRecipe.from_dict({**recipe.to_dict(), "kind": "carve"})
    with pytest.raises(CmoeError, match="--nsamples 0: must be at least 1"):
        FinetuneOptions(nsamples=0)
    with pytest.raises(CmoeError, match="--lora-r 2.5: expected an integer"):
        FinetuneOptions.from_dict({"lora_r": 2.5})
    with pytest.raises(CmoeError, match="the weight must be a finite number"):
        parse_data_spec("a.txt:inf")


@pytest.mark.slow
def test_accelerate_launch_single_process_trains_exactly_like_a_plain_run(tmp_path, carved_dir, train_text):
    """The documented multi-GPU entry point (`accelerate launch`) runs the same loop: one process gives
    the same weights as a plain run."""
    common = [
        "finetune",
        str(carved_dir),
        "--data",
        str(train_text),
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    launched = subprocess.run(
        [*launch, "-m", "cmoe.cli", *common, "-o", str(tmp_path / "launched")], env=env, capture_output=True, text=True
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    torch.set_num_threads(1)
    options = FinetuneOptions(nsamples=4, seqlen=64)
    run_finetune(str(carved_dir), [str(train_text)], tmp_path / "plain", options, device="cpu")
    expected, got = weights(tmp_path / "plain"), weights(tmp_path / "launched")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.slow
def test_two_process_data_parallel_run_matches_one_process_on_the_same_windows(tmp_path, carved_dir, train_text):
    """torchrun with 2 CPU processes (gloo) of batch 1 draws each step's windows exactly as one process of
    batch 2 does; DDP's averaged gradients and the expert loads summed over processes then give the same
    model up to float rounding (LoRA dropout off, as it draws per process)."""
    common = [
        "finetune",
        str(carved_dir),
        "--data",
        str(train_text),
        "--nsamples",
        "8",
        "--seqlen",
        "64",
        "--lora-dropout",
        "0",
        "--lr",
        "2e-3",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cmoe.cli",
            *common,
            "--batch-size",
            "1",
            "-o",
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stderr.count("wrote") == 1, launched.stderr[-2000:]
    ddp = read_recipe(tmp_path / "ddp")["finetune"]
    assert ddp["processes"] == 2 and ddp["samples_per_step"] == 2 and ddp["steps"] == 4
    torch.set_num_threads(1)
    options = replace(FAST, nsamples=8, lora_dropout=0.0, lr=2e-3)
    plain = finetune(carved_dir, tmp_path / "plain", [train_text], options)["finetune"]
    losses = [point["loss"] for point in plain["loss_curve"]]
    assert [point["loss"] for point in ddp["loss_curve"]] == pytest.approx(losses, rel=1e-4)
    expected, got = weights(tmp_path / "plain"), weights(tmp_path / "ddp")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    carved = weights(carved_dir)
    assert not torch.equal(got["model.layers.0.mlp.router.scale"], carved["model.layers.0.mlp.router.scale"])
