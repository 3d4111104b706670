"""Today's numbers, pinned: refactors must leave carving, evaluation, profiling and fine-tuning unchanged.

The expected values in pinned/behaviour.json were measured before the code was restructured (issue 12).
Everything runs through the CLI, the interface that stays put.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cmoe.cli.main import main
from cmoe.io.recipe_file import read_recipe

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, TINYSTORIES_VALID

PINNED = json.loads((Path(__file__).parent / "pinned" / "behaviour.json").read_text())
CALIBRATION = [
    "--data",
    str(TINYSTORIES_TRAIN),
    "--nsamples",
    "4",
    "--seqlen",
    "128",
    "--device",
    "cpu",
    "--batch-size",
    "2",
]
EVALUATION = ["--data", str(TINYSTORIES_VALID), "--seqlen", "128", "--max-windows", "8", "--device", "cpu", "--json"]
CARVES = {
    "S3A3E8-reference": ["--config", "S3A3E8"],
    "S1A1E4-reference": ["--config", "S1A1E4"],
    "S3A3E8-linear-refit": ["--config", "S3A3E8", "--router", "linear", "--refit-down"],
    "S1A1E4-linear-refit": ["--config", "S1A1E4", "--router", "linear", "--refit-down"],
}

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *args: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out


def perplexity(capsys, model) -> float:
    return json.loads(cli(capsys, "eval", "perplexity", str(model), *EVALUATION))["perplexity"]


def tensor_summary(tensor: torch.Tensor) -> dict:
    """Integer tensors by hash (exact); float tensors by sum, norm and a strided sample."""
    if not tensor.is_floating_point():
        return {"sha256": hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()}
    flat = tensor.double().reshape(-1)
    return {
        "sum": float(flat.sum()),
        "norm": float(flat.norm()),
        "sample": flat[:: max(1, flat.numel() // 32)].tolist(),
    }


def profile_summary(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return {name: tensor_summary(handle.get_tensor(name)) for name in sorted(handle.keys())}


def loss_curve(directory: Path) -> list[float]:
    return [point["loss"] for point in read_recipe(directory)["finetune"]["loss_curve"]]


def test_dense_perplexity_is_pinned(capsys):
    assert perplexity(capsys, TINYSTORIES_MODEL) == pytest.approx(PINNED["dense_perplexity"], rel=1e-5)


@pytest.mark.parametrize("name", CARVES)
def test_carved_perplexity_is_pinned(capsys, tmp_path, name):
    out = tmp_path / name
    cli(capsys, "carve", str(TINYSTORIES_MODEL), "-o", str(out), *CARVES[name], *CALIBRATION)
    assert perplexity(capsys, out) == pytest.approx(PINNED["carved_perplexity"][name], rel=1e-5)


def test_profile_tensors_are_pinned(capsys, tmp_path):
    out = tmp_path / "dense.profile.safetensors"
    cli(capsys, "profile", str(TINYSTORIES_MODEL), "-o", str(out), "--gram", *CALIBRATION)
    summary, expected = profile_summary(out), PINNED["profile"]
    assert sorted(summary) == sorted(expected)
    for name, pinned in expected.items():
        if "sha256" in pinned:
            assert summary[name] == pinned, name
        else:
            for key in ("sum", "norm", "sample"):
                assert summary[name][key] == pytest.approx(pinned[key], rel=1e-4, abs=1e-9), (name, key)


def test_finetune_loss_curve_is_pinned(capsys, tmp_path):
    carved = tmp_path / "carved"
    cli(capsys, "carve", str(TINYSTORIES_MODEL), "-o", str(carved), "--config", "S1A1E4", *CALIBRATION)
    tuned = tmp_path / "tuned"
    cli(
        capsys,
        "finetune",
        str(carved),
        "-o",
        str(tuned),
        "--data",
        str(TINYSTORIES_TRAIN),
        "--nsamples",
        "8",
        "--seqlen",
        "64",
        "--batch-size",
        "2",
        "--lr",
        "2e-3",
        "--checkpoint-every",
        "0",
        "--device",
        "cpu",
    )
    assert loss_curve(tuned) == pytest.approx(PINNED["finetune_loss_curve"], rel=1e-5)
