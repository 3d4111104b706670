"""--reconstruct-steps: per-layer block reconstruction towards the dense FFN's outputs."""

from dataclasses import replace

import pytest
import torch

import cmoe
from cmoe import Calibration, Compute, run_carve, run_profile
from cmoe.errors import CmoeError
from cmoe.modeling.configuration_cmoe import MoELayerSpec
from cmoe.modeling.modeling_cmoe import CMoEBlock
from cmoe.numerics.reconstruction import relative_error, straight_through, token_weights
from cmoe.pipeline.reconstruct import RECONSTRUCTED_PARTS, block_output, reconstruct_block
from cmoe.recipes import CarveOptions
from cmoe.shape import MoEShape

from conftest import TINYSTORIES_TRAIN

CPU = Compute(device="cpu", dtype="float32", batch_size=2)
DEVICE = torch.device("cpu")


def _block(seed: int = 1, top_k: int = 2, gating: str = "cmoe") -> CMoEBlock:
    torch.manual_seed(seed)
    spec = MoELayerSpec(num_experts=4, top_k=top_k, shared_size=6, expert_size=4, router="linear", gating=gating)
    block = CMoEBlock(10, "silu", spec)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(std=0.5)
        block.router.scale.zero_()
    return block.eval()


def _state(block: CMoEBlock) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in block.state_dict().items()}


def test_objective_and_weights_by_hand():
    target = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    prediction = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    assert relative_error(prediction, target, torch.ones(2)).item() == pytest.approx(17 / 26)
    assert relative_error(prediction, target, torch.tensor([0.0, 1.0])).item() == pytest.approx(1.0)
    weights = token_weights("residual", torch.tensor([1.0, 4.0]))
    assert weights.tolist() == pytest.approx([1.6, 0.4])
    assert token_weights("uniform", torch.tensor([1.0, 4.0])).tolist() == [1.0, 1.0]


def test_straight_through_keeps_the_gate_values_and_passes_the_probability_gradient():
    probabilities = torch.tensor([0.2, 0.7], requires_grad=True)
    gates = straight_through(torch.ones(2), probabilities)
    assert gates.tolist() == [1.0, 1.0]
    (gates * torch.tensor([2.0, -3.0])).sum().backward()
    assert probabilities.grad.tolist() == [2.0, -3.0]


@pytest.mark.parametrize("gating", ["cmoe", "softmax-renorm"])
def test_block_output_equals_the_block_and_reaches_the_router(gating):
    block = _block(gating=gating)
    x = torch.randn(30, 10)
    out = block_output(block, x)
    with torch.no_grad():
        assert torch.allclose(out, block(x), atol=1e-6)
    out.square().sum().backward()
    assert block.router.proj.weight.grad.abs().sum() > 0


def test_a_block_that_already_matches_is_unchanged(one_thread):
    block = _block()
    x = torch.randn(200, 10)
    with torch.no_grad():
        targets = block(x)
    before_state = _state(block)
    before, after, outputs = reconstruct_block(block, x, targets, torch.ones(200), "all", 20, 1e-2, 64, 0, DEVICE)
    assert before < 1e-12 and after < 1e-12
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, before_state[name]), name
    assert torch.allclose(outputs, targets, atol=1e-6)


def test_outputs_a_stage_already_computed_are_the_starting_point_and_the_fallback(one_thread):
    block, teacher = _block(), _block(seed=2)
    x = torch.randn(200, 10)
    with torch.no_grad():
        own, targets = block(x), teacher(x)
    before, after, _ = reconstruct_block(
        block, x, own, torch.ones(200), "all", 0, 1e-2, 64, 0, DEVICE, initial_outputs=torch.zeros_like(own)
    )
    assert before == pytest.approx(1.0) and after < 1e-12
    before_state = _state(block)
    before, after, outputs = reconstruct_block(
        block, x, targets, torch.ones(200), "all", 5, 1e-2, 64, 0, DEVICE, initial_outputs=targets
    )
    assert before == after == 0.0 and outputs is targets
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, before_state[name]), name


@pytest.mark.parametrize("parts", list(RECONSTRUCTED_PARTS))
def test_the_objective_falls_and_only_the_chosen_parts_move(parts, one_thread):
    block, teacher = _block(seed=1), _block(seed=2)
    x = torch.randn(400, 10)
    with torch.no_grad():
        targets = teacher(x)
    before_state = _state(block)
    before, after, outputs = reconstruct_block(block, x, targets, torch.ones(400), parts, 60, 1e-2, 128, 0, DEVICE)
    assert after < (0.95 if parts == "router" else 0.9) * before
    with torch.no_grad():
        assert torch.allclose(outputs, block(x), atol=1e-6)
    moved = {name for name, tensor in block.state_dict().items() if not torch.equal(tensor, before_state[name])}
    router = {name for name in moved if name.startswith("router.")}
    assert "router.scale" not in moved and "router.bias" not in moved
    assert bool(router) == (parts in ("all", "router"))
    assert bool(moved - router) == (parts in ("all", "experts"))


def test_the_same_seed_gives_the_same_bytes_and_another_seed_differs():
    x, teacher = torch.randn(300, 10), _block(seed=2)
    with torch.no_grad():
        targets = teacher(x)
    results = []
    for seed in (0, 0, 1):
        block = _block()
        reconstruct_block(block, x, targets, torch.ones(300), "all", 10, 1e-2, 50, seed, DEVICE)
        results.append(torch.cat([parameter.flatten() for parameter in block.parameters()]))
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def _calibration() -> Calibration:
    return Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)


def test_a_carve_with_reconstruction_records_lower_errors_and_replays_to_the_same_bytes(
    tiny_model_dir, tmp_path, one_thread
):
    options = CarveOptions.resolved(
        MoEShape.parse("S1A2E8"),
        "quality",
        reconstruct_steps=60,
        reconstruct_lr=1e-3,
        reconstruct_tokens=256,
        reconstruct_parts="experts",
    )
    recipe = run_carve(str(tiny_model_dir), tmp_path / "a", options, _calibration(), compute=CPU)
    errors = recipe["reconstruction_error"]
    assert [row["layer"] for row in errors] == [0, 1]
    assert all(row["after"] < row["before"] for row in errors)
    assert recipe["recipe"]["options"]["reconstruct_steps"] == 60
    run_carve(str(tiny_model_dir), tmp_path / "b", options, _calibration(), compute=CPU)
    for name in ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    plain = run_carve(
        str(tiny_model_dir), tmp_path / "c", replace(options, reconstruct_steps=0), _calibration(), compute=CPU
    )
    assert "reconstruction_error" not in plain
    ids = torch.randint(0, 2000, (1, 16))
    assert not torch.equal(cmoe.load_carved(tmp_path / "a")(ids).logits, cmoe.load_carved(tmp_path / "c")(ids).logits)


def test_the_quality_preset_reconstructs_a_carve_that_keeps_a_quarter_active(tiny_model_dir, tmp_path, one_thread):
    options = CarveOptions.resolved(MoEShape.parse("S1A1E8"), "quality")
    recipe = run_carve(str(tiny_model_dir), tmp_path / "q", options, _calibration(), compute=CPU)
    assert recipe["recipe"]["options"]["reconstruct_steps"] == 50
    assert all(row["after"] < row["before"] for row in recipe["reconstruction_error"])


def test_reconstruction_refuses_what_it_cannot_do(tiny_model_dir, tmp_path):
    shape = MoEShape.parse("S1A2E8")
    with pytest.raises(CmoeError, match="--budget uniform"):
        CarveOptions.resolved(shape, router="linear", budget="adaptive", reconstruct_steps=5)
    with pytest.raises(CmoeError, match="--reconstruct-lr 0.0: must be positive"):
        CarveOptions.resolved(shape, reconstruct_steps=5, reconstruct_lr=0.0)
    with pytest.raises(CmoeError, match="--refit-ridge -1: must be positive"):
        CarveOptions.resolved(shape, "quality", refit_ridge=-1)
    with pytest.raises(CmoeError, match="--reconstruct-parts"):
        CarveOptions.resolved(shape, reconstruct_parts="attention")
    with pytest.raises(CmoeError, match="--reconstruct-weighting"):
        CarveOptions.resolved(shape, reconstruct_weighting="loss")
    run_profile(str(tiny_model_dir), tmp_path / "p.safetensors", _calibration(), compute=CPU)
    options = CarveOptions.resolved(shape, reconstruct_steps=5)
    with pytest.raises(CmoeError, match="--reconstruct-steps"):
        run_carve(str(tiny_model_dir), tmp_path / "fp", options, None, tmp_path / "p.safetensors", CPU)
