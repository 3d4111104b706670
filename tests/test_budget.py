"""The adaptive budget: per-layer active experts at the uniform budget's total, chosen on measured error."""

import itertools

import pytest
import torch

import cmoe
from cmoe.numerics.budget import allocate_active_experts, selection_errors
from cmoe import Calibration, Compute, run_carve
from cmoe.shape import MoEShape
from cmoe.errors import CmoeError
from cmoe.export import check_options_exportable
from cmoe.recipes import CarveOptions, active_experts_of

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, tiny_llama, tinystories_calibration_windows

CPU = Compute(device="cpu", dtype="float32", batch_size=2)


def test_selection_errors_follow_the_router_order_by_hand():
    target = torch.tensor([[3.0]])
    shared = torch.tensor([[0.0]])
    experts = torch.tensor([[[1.0], [2.0]]])
    assert selection_errors(target, shared, experts, torch.tensor([[0.1, 0.9]])).tolist() == [9.0, 1.0, 0.0]
    assert selection_errors(target, shared, experts, torch.tensor([[0.9, 0.1]])).tolist() == [9.0, 4.0, 0.0]


def test_selection_errors_weight_each_token():
    target = torch.tensor([[3.0], [1.0]])
    shared = torch.tensor([[1.0], [0.0]])
    experts = torch.tensor([[[2.0], [1.0]], [[0.0], [1.0]]])
    preference = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    # token 0: residual 2, picks 1.0 then 2.0 -> errors 4, 1, 1; token 1: residual 1, picks 0.0 then 1.0 -> 1, 1, 0
    assert selection_errors(target, shared, experts, preference).tolist() == [5.0, 2.0, 1.0]
    weighted = selection_errors(target, shared, experts, preference, torch.tensor([0.5, 2.0]))
    assert weighted.tolist() == [4.0, 2.5, 0.5]


def test_allocation_by_hand_and_against_brute_force():
    errors = torch.tensor([[10.0, 1.0, 0.5], [5.0, 4.0, 3.0]])
    assert allocate_active_experts(errors, 2) == [1, 1]
    assert allocate_active_experts(errors, 1) == [1, 0]
    assert allocate_active_experts(errors, 4) == [2, 2]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        errors = torch.rand(4, 4, generator=generator).sort(dim=1, descending=True).values
        for total in range(13):
            best = min(
                (split for split in itertools.product(range(4), repeat=4) if sum(split) == total),
                key=lambda split: sum(errors[layer, k].item() for layer, k in enumerate(split)),
            )
            chosen = allocate_active_experts(errors, total)
            assert sum(chosen) == total
            assert sum(errors[layer, k] for layer, k in enumerate(chosen)) == pytest.approx(
                sum(errors[layer, k] for layer, k in enumerate(best))
            )
    with pytest.raises(ValueError):
        allocate_active_experts(torch.zeros(2, 3), 5)


def test_adaptive_budget_keeps_the_total_reloads_and_zero_experts_means_shared_only(tmp_path):
    calibration = Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)
    options = CarveOptions(MoEShape.parse("S1A1E4"), budget="adaptive")
    recipe = run_carve(str(TINYSTORIES_MODEL), tmp_path / "adaptive", options, calibration, compute=CPU)
    per_layer = recipe["active_experts_per_layer"]
    assert sum(per_layer) == 2 * 1 and per_layer != [1, 1]
    model = cmoe.load_carved(tmp_path / "adaptive")
    assert [layer["top_k"] for layer in model.config.cmoe_layers] == per_layer
    assert recipe["mean_active_ffn_neurons"] == pytest.approx(96 + 96 * sum(per_layer) / 2)
    ids = torch.randint(0, 2000, (1, 16))
    assert torch.equal(model(ids).logits, cmoe.load_carved(tmp_path / "adaptive")(ids).logits)
    idle = next(layer.mlp for layer in model.model.layers if layer.mlp.top_k == 0)
    x = torch.randn(5, 128)
    assert torch.equal(idle(x), idle.shared(x))


def test_adaptive_budget_refuses_a_profile(tmp_path):
    options = CarveOptions(MoEShape.parse("S1A1E4"), budget="adaptive")
    with pytest.raises(CmoeError, match="--budget adaptive"):
        run_carve(str(TINYSTORIES_MODEL), tmp_path / "x", options, None, tmp_path / "missing.safetensors", CPU)


def test_budget_from_refits_each_layer_for_an_earlier_carves_allocation(tmp_path):
    """The two-pass budget: the adaptive carve's allocation, then the refit fits each layer for its own k,
    which lowers the loss against the same allocation imposed after a uniform refit."""
    calibration = Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)
    shape = MoEShape.parse("S1A1E4")
    first = run_carve(
        str(TINYSTORIES_MODEL), tmp_path / "first", CarveOptions(shape, budget="adaptive"), calibration, compute=CPU
    )
    allocation = active_experts_of(tmp_path / "first")
    assert list(allocation) == first["active_experts_per_layer"] and allocation != (1, 1)
    refit = {"router": "linear", "refit_down": True}
    options = CarveOptions(shape, active_per_layer=allocation, **refit)
    second = run_carve(str(TINYSTORIES_MODEL), tmp_path / "second", options, calibration, compute=CPU)
    assert second["active_experts_per_layer"] == list(allocation)
    assert cmoe.read_recipe(tmp_path / "second")["recipe"]["options"]["active_per_layer"] == list(allocation)
    assert "fixed by --budget-from" in (tmp_path / "second" / "README.md").read_text()
    run_carve(str(TINYSTORIES_MODEL), tmp_path / "uniform", CarveOptions(shape, **refit), calibration, compute=CPU)
    imposed = cmoe.load_carved(tmp_path / "uniform")
    for layer, k in zip(imposed.model.layers, allocation):
        layer.mlp.top_k = k
    model = cmoe.load_carved(tmp_path / "second")
    windows = tinystories_calibration_windows(calibration)
    with torch.no_grad():
        assert model(windows, labels=windows).loss < imposed(windows, labels=windows).loss
        assert torch.equal(model(windows).logits, cmoe.load_carved(tmp_path / "second")(windows).logits)


def test_budget_from_is_checked_before_carving(tmp_path):
    shape = MoEShape.parse("S1A1E4")
    with pytest.raises(CmoeError, match="has 3 routed experts"):
        CarveOptions(shape, active_per_layer=(1, 4))
    with pytest.raises(CmoeError, match="not with --budget adaptive"):
        CarveOptions(shape, active_per_layer=(1, 1), budget="adaptive")
    with pytest.raises(CmoeError, match="the model has 2 layers"):
        CarveOptions(shape, active_per_layer=(1, 1, 1)).check(384, 2)
    with pytest.raises(CmoeError, match="its own top-k"):
        check_options_exportable(CarveOptions(shape, router="linear-gate", active_per_layer=(2, 0)), "qwen2-moe")
    assert CarveOptions.from_dict(CarveOptions(shape, active_per_layer=(2, 0)).to_dict()).active_per_layer == (2, 0)
    (tmp_path / "recipe.yaml").write_text("kind: profile\n")
    with pytest.raises(CmoeError, match="no active_experts_per_layer"):
        active_experts_of(tmp_path / "recipe.yaml")


def test_budget_from_the_uniform_allocation_writes_the_uniform_carves_weights_and_repeats_its_bytes():
    """Every layer given the shape's own k is the uniform carve, bit for bit; the same command twice, the same bytes."""
    windows = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    shape = MoEShape.parse("S1A2E4")
    refit = {"router": "linear", "refit_down": True, "refit_drift": 0.5}
    uniform = cmoe.carve_model(tiny_llama(seed=3), windows, CarveOptions(shape, **refit)).state_dict()
    given = [
        cmoe.carve_model(tiny_llama(seed=3), windows, CarveOptions(shape, active_per_layer=allocation, **refit))
        for allocation in ((2, 2), (0, 1), (0, 1))
    ]
    same, first, again = (model.state_dict() for model in given)
    assert uniform.keys() == same.keys() and all(torch.equal(uniform[key], same[key]) for key in uniform)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert [layer.mlp.top_k for layer in given[1].model.layers] == [0, 1]
    assert not all(torch.equal(first[key], uniform[key]) for key in first)
