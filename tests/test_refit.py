"""--refit-down: least-squares refit of the down projections with the routing fixed."""

from types import SimpleNamespace

import pytest
import torch

import cmoe
from cmoe.pipeline.blocks import (
    down_projections,
    refit_down_projections,
    refit_router_scores,
    routed_pieces,
    router_projection,
)
from cmoe import Calibration, Compute, run_carve
from cmoe.shape import MoEShape
from cmoe.errors import CmoeError
from cmoe.modeling.configuration_cmoe import MoELayerSpec
from cmoe.modeling.modeling_cmoe import CMoEBlock
from cmoe.recipes import CarveOptions
from cmoe.pipeline.sequential import LayerWork
from cmoe.pipeline.stages import RefitRouter, carve_stages, residual_token_weights
from cmoe.numerics.refit import ArrowGram, DenseGram, Piece, accumulate_normal_equations, solve_down_projection
from cmoe.numerics.router_fit import best_selection, ridge_solve, selection_benefit

from conftest import (
    TINYSTORIES_MODEL,
    TINYSTORIES_TRAIN,
    save_tiny_model,
    tiny_llama,
    tinystories_calibration_windows,
    weights_of,
)

CPU = Compute(device="cpu", dtype="float32", batch_size=2)


def test_normal_equations_by_hand():
    """3 tokens; shared feature 1, 2, 3 on all; expert A (feature 1) on tokens 0 and 2; B (2) on token 1."""
    pieces = [
        Piece(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0, 1, 2])),
        Piece(torch.tensor([[1.0], [1.0]]), torch.tensor([0, 2])),
        Piece(torch.tensor([[2.0]]), torch.tensor([1])),
    ]
    target = torch.tensor([[1.0], [10.0], [100.0]])
    gram, cross = DenseGram([1, 1, 1], "cpu"), torch.zeros(3, 1, dtype=torch.float64)
    accumulate_normal_equations(gram, cross, pieces, [0, 1, 2], target)
    assert gram.matrix.triu().tolist() == [[14.0, 4.0, 4.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0]]
    assert cross.flatten().tolist() == [321.0, 101.0, 20.0]
    arrow = ArrowGram([1, 1, 1], "cpu", shared=True)
    accumulate_normal_equations(arrow, torch.zeros(3, 1, dtype=torch.float64), pieces, [0, 1, 2], target)
    assert [block.item() for block in arrow.diagonal] == [14.0, 2.0, 4.0]
    assert [block.item() for block in arrow.border[1:]] == [4.0, 4.0]


def _top1_pieces(tokens: int, sizes: list[int], shared: bool, seed: int = 0) -> list[Piece]:
    generator = torch.Generator().manual_seed(seed)
    expert_of = torch.randint(len(sizes) - shared, (tokens,), generator=generator)
    pieces = [Piece(torch.randn(tokens, sizes[0], generator=generator), torch.arange(tokens))] if shared else []
    for expert, size in enumerate(sizes[int(shared) :]):
        rows = (expert_of == expert).nonzero().flatten()
        pieces.append(Piece(torch.randn(len(rows), size, generator=generator), rows))
    return pieces


@pytest.mark.parametrize("scale", ["mean", "feature"])
@pytest.mark.parametrize("shared", [True, False])
def test_arrow_system_solves_top1_routing_as_the_whole_system_does(shared, scale):
    sizes = [5, 3, 4, 3] if shared else [3, 4, 3]
    pieces = _top1_pieces(80, sizes, shared)
    offsets = [sum(sizes[:index]) for index in range(len(sizes))]
    target = torch.randn(80, 6)
    initial = torch.randn(6, sum(sizes))
    solutions = []
    for gram in (DenseGram(sizes, "cpu"), ArrowGram(sizes, "cpu", shared)):
        cross = torch.zeros(sum(sizes), 6, dtype=torch.float64)
        accumulate_normal_equations(gram, cross, pieces, offsets, target)
        solutions.append(gram.solve(cross, initial, ridge=0.3, scale=scale))
    assert torch.allclose(solutions[0], solutions[1], rtol=1e-9, atol=1e-12)


def test_arrow_system_refuses_experts_that_share_a_token():
    pieces = [Piece(torch.ones(2, 1), torch.tensor([0, 1])), Piece(torch.ones(1, 1), torch.tensor([1]))]
    with pytest.raises(ValueError, match="top-1"):
        accumulate_normal_equations(
            ArrowGram([1, 1], "cpu", shared=False),
            torch.zeros(2, 1, dtype=torch.float64),
            pieces,
            [0, 1],
            torch.ones(2, 1),
        )


def test_solve_recovers_exact_weights_and_large_ridge_keeps_the_initial_ones():
    torch.manual_seed(0)
    z, truth, initial = torch.randn(200, 6), torch.randn(4, 6), torch.randn(4, 6)
    gram, cross = (z.T @ z).double().triu(), (z.T @ (z @ truth.T)).double()
    assert torch.allclose(solve_down_projection(gram.clone(), cross, initial, ridge=1e-12).float(), truth, atol=1e-4)
    assert torch.allclose(solve_down_projection(gram.clone(), cross, initial, ridge=1e9).float(), initial, atol=1e-4)
    garbage_below = gram + torch.randn(6, 6, dtype=torch.float64).tril(-1) * 1e3
    expected = solve_down_projection(gram.clone(), cross, initial)
    assert torch.equal(solve_down_projection(garbage_below, cross, initial), expected), "only the upper triangle"


def test_feature_ridge_is_the_closed_form_with_each_feature_pulled_by_its_own_energy():
    torch.manual_seed(2)
    z, y, initial = torch.randn(50, 5).double(), torch.randn(50, 3).double(), torch.randn(3, 5).double()
    z[:, 1] *= 0.01  # a rarely active feature
    gram = z.T @ z
    penalty = torch.diag(0.5 * gram.diagonal())
    expected = torch.linalg.solve(gram + penalty, z.T @ y + penalty @ initial.T).T
    solved = solve_down_projection(gram.triu(), z.T @ y, initial, ridge=0.5, scale="feature")
    assert torch.allclose(solved, expected, rtol=1e-10, atol=1e-12)


def test_feature_ridge_does_not_depend_on_a_features_scale_and_the_mean_ridge_does():
    """Scaling feature i by c (its initial weight by 1/c) scales its fitted weight by 1/c and leaves the
    fit unchanged under the per-feature ridge; under the mean ridge the rescaled feature is pulled harder."""
    torch.manual_seed(3)
    z, y, initial = torch.randn(60, 4).double(), torch.randn(60, 2).double(), torch.randn(2, 4).double()
    c = torch.tensor([1.0, 0.05, 1.0, 1.0], dtype=torch.float64)
    fits = {}
    for scale in ("mean", "feature"):
        plain = solve_down_projection((z.T @ z).triu(), z.T @ y, initial, ridge=0.3, scale=scale)
        zc = z * c
        scaled = solve_down_projection((zc.T @ zc).triu(), zc.T @ y, initial / c, ridge=0.3, scale=scale)
        fits[scale] = (plain, scaled * c)
    assert torch.allclose(*fits["feature"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(*fits["mean"], rtol=1e-3, atol=1e-6)


def _random_block(spec: dict) -> CMoEBlock:
    torch.manual_seed(1)
    block = CMoEBlock(10, "silu", MoELayerSpec(**{"router": "linear", **spec}))
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_()
    return block


def _stacked_features(block: CMoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Every down projection's input for tokens `x`, side by side (zero where an expert is not routed)."""
    downs = down_projections(block)
    stacked = torch.zeros(x.shape[0], sum(down.weight.shape[1] for down in downs))
    offset = 0
    for piece, down in zip(routed_pieces(block, x), downs):
        stacked[piece.rows, offset : offset + piece.features.shape[1]] = piece.features
        offset += piece.features.shape[1]
    return stacked


@pytest.mark.parametrize(
    "spec",
    [
        {"num_experts": 6, "top_k": 2, "shared_size": 8, "expert_size": 4},
        {"num_experts": 6, "top_k": 0, "shared_size": 8, "expert_size": 4},
        {"num_experts": 6, "top_k": 1, "shared_size": 8, "expert_size": 4},
        {"num_experts": 4, "top_k": 1, "shared_size": 0, "expert_size": 5, "gating": "softmax-renorm"},
        {"num_experts": 4, "top_k": 3, "shared_size": 0, "expert_size": 5},
        {"num_experts": 6, "top_k": 2, "shared_size": 8, "expert_size": 4, "gating": "softmax-renorm"},
        {"num_experts": 6, "top_k": 3, "shared_size": 0, "expert_size": 4, "gating": "sigmoid-renorm"},
    ],
)
def test_pieces_reproduce_the_block_and_the_refit_recovers_other_down_weights(spec):
    block = _random_block(spec)
    x = torch.randn(160, 10)
    pieces = routed_pieces(block, x)
    downs = down_projections(block)
    stacked = _stacked_features(block, x)
    with torch.no_grad():
        assert torch.allclose(block(x), stacked @ torch.cat([down.weight for down in downs], dim=1).T, atol=1e-4)
        truth = [torch.randn_like(down.weight) for down in downs]
        target = stacked @ torch.cat(truth, dim=1).T
        refitted = refit_down_projections(block, [x[:70], x[70:]], [target[:70], target[70:]], ridge=1e-10)
        assert torch.allclose(torch.cat(refitted), block(x), atol=1e-4)
        used = [bool(len(piece.rows)) for piece in pieces]
        for down, true, active in zip(downs, truth, used):
            if active:
                assert torch.allclose(down.weight, true, atol=1e-3)
        assert torch.allclose(block(x), target, atol=1e-3)


def test_refit_leaves_a_block_that_already_matches_its_targets_unchanged():
    block = _random_block({"num_experts": 4, "top_k": 2, "shared_size": 3, "expert_size": 3})
    x = torch.randn(40, 10)
    with torch.no_grad():
        before = [down.weight.clone() for down in down_projections(block)]
        refit_down_projections(block, [x], [block(x)], ridge=1e-2)
    for old, down in zip(before, down_projections(block)):
        assert torch.allclose(old, down.weight, atol=1e-4)


def test_carve_with_refit_lowers_calibration_loss_and_reloads(tmp_path):
    calibration = Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)
    windows = tinystories_calibration_windows(calibration)
    results = {}
    for refit in (False, True):
        options = CarveOptions(MoEShape.parse("S1A1E8"), router="linear", refit_down=refit)
        recipe = run_carve(str(TINYSTORIES_MODEL), tmp_path / str(refit), options, calibration, compute=CPU)
        assert recipe["refit_down"] is refit
        assert ("refitted by least squares" in (tmp_path / str(refit) / "README.md").read_text()) is refit
        model = cmoe.load_carved(tmp_path / str(refit))
        with torch.no_grad():
            results[refit] = model(windows, labels=windows).loss.item()
            assert torch.equal(model(windows).logits, cmoe.load_carved(tmp_path / str(refit))(windows).logits)
    assert results[True] < results[False]


def test_refit_refuses_a_profile_and_the_adaptive_budget(tmp_path):
    options = CarveOptions(MoEShape.parse("S1A1E4"), refit_down=True)
    with pytest.raises(CmoeError, match="--refit-down"):
        run_carve(str(TINYSTORIES_MODEL), tmp_path / "x", options, None, tmp_path / "missing.safetensors", CPU)
    with pytest.raises(CmoeError, match="--budget uniform"):
        CarveOptions(MoEShape.parse("S1A1E4"), refit_down=True, budget="adaptive").check(384, 2)


def _last_layer_outputs(model, windows: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, output: captured.setdefault("out", output)
    )
    try:
        with torch.no_grad():
            model(windows)
    finally:
        handle.remove()
    out = captured["out"]
    return (out[0] if isinstance(out, tuple) else out).float()


def _carve_tiny(shape: str, windows: torch.Tensor, **options) -> torch.nn.Module:
    return cmoe.carve_model(tiny_llama(seed=3), windows, CarveOptions(MoEShape.parse(shape), **options))


def test_refit_drift_changes_nothing_when_the_carved_stream_is_the_dense_one():
    """All experts active: every carved layer is the dense one, so both streams agree and there is no drift."""
    windows = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    plain = _carve_tiny("S0A8E8", windows, router="linear", refit_down=True)
    drifting = _carve_tiny("S0A8E8", windows, router="linear", refit_down=True, refit_drift=1.0)
    assert torch.allclose(_last_layer_outputs(plain, windows), _last_layer_outputs(drifting, windows), atol=1e-5)


def test_refit_drift_brings_the_last_layer_closer_to_the_dense_model():
    """Two layers: the first is carved alike (no drift below it), so with drift 1 the second layer's refit
    minimises exactly its output's distance to the dense model's, which drift 0 cannot beat."""
    windows = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    dense = _last_layer_outputs(tiny_llama(seed=3), windows)
    errors = {}
    for drift in (0.0, 0.5, 1.0):
        carved = _carve_tiny("S1A1E4", windows, router="linear", refit_down=True, refit_drift=drift)
        errors[drift] = (_last_layer_outputs(carved, windows) - dense).square().sum().item()
    assert errors[1.0] < errors[0.5] < errors[0.0]


def test_refit_drift_is_checked_when_the_options_are_built(tmp_path):
    shape = MoEShape.parse("S1A1E4")
    with pytest.raises(CmoeError, match="--refit-drift 1.5: must be between 0 and 1"):
        CarveOptions(shape, refit_down=True, refit_drift=1.5)
    assert "dense_stream" not in [stage.name for stage in carve_stages(CarveOptions(shape, refit_drift=0.5))]
    with pytest.raises(CmoeError, match="--propagate dense"):
        CarveOptions(shape, refit_down=True, refit_drift=0.5, propagate="dense")
    options = CarveOptions(shape, refit_down=True, refit_drift=1.0)
    with pytest.raises(CmoeError, match="follows the dense model.s stream on calibration data"):
        run_carve(str(TINYSTORIES_MODEL), tmp_path / "x", options, None, tmp_path / "missing.safetensors", CPU)


@pytest.mark.parametrize("extra", [{"refit_drift": 1.0}, {"refit_router": True}])
def test_a_carve_with_refit_drift_or_router_refit_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, extra):
    model = save_tiny_model(tmp_path / "dense", layers=3)
    calibration = Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)
    options = CarveOptions(MoEShape.parse("S1A1E4"), router="linear", refit_down=True, **extra)
    run_carve(str(model), tmp_path / "whole", options, calibration, compute=CPU)

    def stop_after_two_layers(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_carve(str(model), tmp_path / "resumed", options, calibration, compute=CPU, on_layer=stop_after_two_layers)
    run_carve(str(model), tmp_path / "resumed", options, calibration, compute=CPU, resume=True)
    whole, resumed = weights_of(tmp_path / "whole"), weights_of(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_selection_benefit_and_best_selection_by_hand():
    """Residual (3, 0): an output equal to it removes all 9, twice it removes nothing, its opposite adds 27."""
    residual = torch.tensor([[3.0, 0.0]]).expand(3, 2)
    outputs = torch.tensor([[3.0, 0.0], [6.0, 0.0], [-3.0, 0.0]])
    assert selection_benefit(residual, outputs).tolist() == [9.0, 0.0, -27.0]
    benefit = torch.tensor([[1.0, 5.0, -2.0], [0.5, -1.0, 0.7]])
    assert best_selection(benefit, 1).tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert best_selection(benefit, 2).tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_ridge_solve_recovers_an_exact_linear_map():
    design = torch.randn(200, 5, generator=torch.Generator().manual_seed(0)).double()
    truth = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).double()
    solution = ridge_solve(design.T @ design, design.T @ (design @ truth), ridge=1e-12)
    assert torch.allclose(solution, truth, atol=1e-8)


def _two_expert_block(router: str) -> CMoEBlock:
    """Two experts of one neuron writing to orthogonal output directions (expert e to dimension e), and a
    router that scores on x_1 alone (+x_1 for expert 0, -x_1 for expert 1)."""
    block = CMoEBlock(4, "silu", MoELayerSpec(0, 2, 1, 1, router=router))
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.zero_()
        for index, expert in enumerate(block.experts):
            expert.gate_proj.weight[0, 2 + index] = 1.0
            expert.up_proj.weight[0, 2 + index] = 1.0
            expert.down_proj.weight[index, 0] = 1.0
        router_projection(block).weight[:, 1] = torch.tensor([1.0, -1.0])
    return block.eval()


@pytest.mark.parametrize("router", ["linear", "linear-gate"])
def test_the_router_refit_learns_which_expert_removes_the_error(router):
    """The target is expert 0's output where x_0 > 0 and expert 1's elsewhere: only the refitted router can
    tell, from x_0, which one a token needs (the one it starts from reads x_1, independent of x_0)."""
    block = _two_expert_block(router)
    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(2))
    x[:, 2:] = 1.0
    with torch.no_grad():
        outputs = torch.stack([expert(x) for expert in block.experts], dim=1)
        needed = (x[:, 0] <= 0).long()
        target = outputs[torch.arange(len(x)), needed]
        before = (block.router(x).indices[:, 0] == needed).float().mean().item()
        refit_router_scores(block, [x], [target], gate_value=1.0, logit_factor=1.0)
        after = (block.router(x).indices[:, 0] == needed).float().mean().item()
    assert before < 0.6 and after > 0.95


def _layer_tensors(directory, layer: int, part: str) -> dict:
    prefix = f"model.layers.{layer}.mlp."
    return {key: value for key, value in weights_of(directory).items() if key.startswith(prefix) and part in key}


def test_router_refit_keeps_the_fit_with_the_lower_calibration_error(tmp_path):
    """Layer 0 sees the same inputs with and without --refit-router: its router and down projections are
    the plain refit's exactly when the record says the router refit did not lower the error."""
    model = save_tiny_model(tmp_path / "dense", layers=2)
    calibration = Calibration(str(TINYSTORIES_TRAIN), nsamples=2, seqlen=64, seed=0)
    carved = {}
    for refit_router in (False, True):
        options = CarveOptions(MoEShape.parse("S1A1E4"), router="linear", refit_down=True, refit_router=refit_router)
        carved[refit_router] = tmp_path / str(refit_router)
        record = run_carve(str(model), carved[refit_router], options, calibration, compute=CPU)
    errors = record["router_refit_error"]
    assert [entry["layer"] for entry in errors] == [0, 1]
    assert all(0 < entry["before"] < 1 and entry["after"] > 0 for entry in errors)
    improved = errors[0]["after"] < errors[0]["before"]
    for part in ("router", "down_proj"):
        plain, refitted = (_layer_tensors(carved[flag], 0, part) for flag in (False, True))
        assert plain and plain.keys() == refitted.keys()
        assert all(torch.equal(plain[key], refitted[key]) for key in plain) is not improved
    assert "routed layers (where it lowered the calibration error)" in (carved[True] / "README.md").read_text()


def test_router_refit_under_a_flattened_renormalising_gate_keeps_the_gate_flat():
    """--flat-gate: the refitted scores are scaled like FlattenGate's, so every selected expert still weighs
    about 1/k."""
    windows = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    model = _carve_tiny(
        "S1A2E4",
        windows,
        router="linear-gate",
        gating="softmax-renorm",
        flat_gate=True,
        refit_down=True,
        refit_router=True,
    )
    block = model.model.layers[0].mlp
    with torch.no_grad():
        routing = block.router(torch.randn(64, block.router.gate.weight.shape[1]))
    assert torch.allclose(routing.weights, torch.full_like(routing.weights, 0.5), rtol=1e-3)


def test_router_refit_is_checked_when_the_options_are_built():
    shape = MoEShape.parse("S1A1E4")
    with pytest.raises(CmoeError, match="add --refit-down"):
        CarveOptions(shape, router="linear", refit_router=True)
    with pytest.raises(CmoeError, match="--router analytic has none"):
        CarveOptions(shape, refit_down=True, refit_router=True)
    with pytest.raises(CmoeError, match="pass --flat-gate"):
        CarveOptions(shape, router="linear-gate", gating="softmax-renorm", refit_down=True, refit_router=True)
    flat = CarveOptions(
        shape, router="linear-gate", gating="softmax-renorm", flat_gate=True, refit_down=True, refit_router=True
    )
    assert [stage.name for stage in carve_stages(flat)][-2:] == ["refit", "refit_router"]
    assert "refit_router" not in [stage.name for stage in carve_stages(CarveOptions(shape, refit_down=True))]


def test_weighted_refit_is_the_closed_form_weighted_least_squares():
    block = _random_block({"num_experts": 4, "top_k": 2, "shared_size": 3, "expert_size": 3})
    x, target = torch.randn(90, 10), torch.randn(90, 10)
    weights = torch.rand(90, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        z = _stacked_features(block, x).double()
        initial = torch.cat([down.weight for down in down_projections(block)], dim=1).double()
        gram = z.T @ (weights.double()[:, None] * z)
        penalty = 0.05 * gram.diagonal().mean()
        expected = torch.linalg.solve(
            gram + penalty * torch.eye(len(gram), dtype=torch.float64),
            z.T @ (weights.double()[:, None] * target.double()) + penalty * initial.T,
        ).T
        refit_down_projections(
            block, [x[:50], x[50:]], [target[:50], target[50:]], 0.05, weights=list(weights.split(50))
        )
        fitted = torch.cat([down.weight for down in down_projections(block)], dim=1).double()
    assert torch.allclose(fitted, expected, atol=1e-4)


def test_unit_weights_give_the_unweighted_refit_and_a_zero_weight_token_is_ignored():
    x, target = torch.randn(60, 10), torch.randn(60, 10)
    moved = target.clone()
    moved[7] += 100.0
    fits = []
    for y, weights in (
        (target, None),
        (target, [torch.ones(60)]),
        (moved, [torch.ones(60).index_fill(0, torch.tensor([7]), 0.0)]),
        (target, [torch.ones(60).index_fill(0, torch.tensor([7]), 0.0)]),
    ):
        block = _random_block({"num_experts": 4, "top_k": 1, "shared_size": 3, "expert_size": 3})
        with torch.no_grad():
            refit_down_projections(block, [x], [y], 1e-2, weights=weights)
        fits.append(torch.cat([down.weight for down in down_projections(block)], dim=1))
    assert torch.equal(fits[0], fits[1])
    assert torch.allclose(fits[2], fits[3], atol=1e-5) and not torch.allclose(fits[0], fits[3], atol=1e-5)


def test_residual_token_weights_are_inverse_energies_with_mean_one_over_every_batch():
    residual = [torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[0.0, 4.0]]])]
    weights = residual_token_weights("residual", residual)
    inverse = torch.tensor([1.0, 0.25, 0.0625])
    assert [len(w) for w in weights] == [2, 1]
    assert torch.allclose(torch.cat(weights), inverse / inverse.mean())


def test_a_weighted_refit_carve_is_deterministic_differs_from_the_uniform_one_and_is_checked(tmp_path):
    windows = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    carves = [
        _carve_tiny("S1A1E4", windows, router="linear", refit_down=True, refit_drift=0.5, refit_weighting=weighting)
        for weighting in ("residual", "residual", "uniform")
    ]
    first, again, uniform = (model.state_dict() for model in carves)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], uniform[key]) for key in first)
    shape = MoEShape.parse("S1A1E4")
    with pytest.raises(CmoeError, match="--refit-weighting heavy: expected one of uniform, residual"):
        CarveOptions(shape, refit_down=True, refit_weighting="heavy")
    with pytest.raises(CmoeError, match="add --refit-down"):
        CarveOptions(shape, refit_weighting="residual")
    with pytest.raises(CmoeError, match="not with --refit-router"):
        CarveOptions(shape, router="linear", refit_down=True, refit_router=True, refit_weighting="residual")
    with pytest.raises(CmoeError, match="not with --refit-weighting"):
        CarveOptions(shape, refit_down=True, shared_width="adaptive", refit_weighting="residual")


def test_router_refit_keeps_a_block_that_already_matches_its_targets():
    """Nothing to improve (the block's outputs are its targets): the stage restores the first fit exactly."""
    block = _random_block({"num_experts": 4, "top_k": 2, "shared_size": 3, "expert_size": 3})
    x = torch.randn(64, 10)
    with torch.no_grad():
        target = block(x)
    before = {key: value.clone() for key, value in block.state_dict().items()}
    carved = [down.weight.detach().clone() for down in down_projections(block)]
    work = LayerWork(0, None, None, inputs=[x], outputs=[target], block=block, block_outputs=[target.clone()])
    work.carved_down = carved
    stage = RefitRouter(1e-2, "mean", gate_value=1.0, logit_factor=1.0)
    stage.layer(SimpleNamespace(timer=cmoe.StageTimer()), work)
    assert all(torch.equal(before[key], value) for key, value in block.state_dict().items())
    assert stage.errors[0]["before"] == 0.0


def test_a_weighted_refit_weighs_each_batch_by_its_own_tokens():
    """One batch of four windows or four batches of one: each token keeps its weight (normalised over all
    of them), so the carves agree; weights attached to the wrong batch would not."""
    windows = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    options = CarveOptions(MoEShape.parse("S1A1E4"), router="linear", refit_down=True, refit_weighting="residual")
    carved = [cmoe.carve_model(tiny_llama(seed=3), windows, options, batch_size=size).state_dict() for size in (4, 1)]
    assert all(torch.allclose(carved[0][key], carved[1][key], rtol=1e-4, atol=1e-5) for key in carved[0])
