"""--refit-down: least-squares refit of the down projections with the routing fixed."""

import pytest
import torch

import cmoe
from cmoe.pipeline.blocks import down_projections, refit_down_projections, routed_pieces
from cmoe import Calibration, Compute, run_carve
from cmoe.shape import MoEShape
from cmoe.errors import CmoeError
from cmoe.modeling.configuration_cmoe import MoELayerSpec
from cmoe.modeling.modeling_cmoe import CMoEBlock
from cmoe.recipes import CarveOptions
from cmoe.pipeline.stages import carve_stages
from cmoe.numerics.refit import ArrowGram, DenseGram, Piece, accumulate_normal_equations, solve_down_projection

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, save_tiny_model, tiny_llama, weights_of

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
    stacked = torch.zeros(160, sum(down.weight.shape[1] for down in downs))
    offset = 0
    for piece, down in zip(pieces, downs):
        stacked[piece.rows, offset : offset + piece.features.shape[1]] = piece.features
        offset += piece.features.shape[1]
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
    from cmoe.calibration import calibration_windows, load_text, tokenize_text
    from cmoe.io.loading import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source(str(TINYSTORIES_MODEL)))
    windows = calibration_windows(tokenize_text(load_text(str(TINYSTORIES_TRAIN), "train").text, tokenizer), 4, 64, 0)
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
        CarveOptions(MoEShape.parse("S1A1E4"), refit_down=True, budget="adaptive").check(384)


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


def test_a_carve_with_refit_drift_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path):
    model = save_tiny_model(tmp_path / "dense", layers=3)
    calibration = Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)
    options = CarveOptions(MoEShape.parse("S1A1E4"), router="linear", refit_down=True, refit_drift=1.0)
    run_carve(str(model), tmp_path / "whole", options, calibration, compute=CPU)

    def stop_after_two_layers(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_carve(str(model), tmp_path / "resumed", options, calibration, compute=CPU, on_layer=stop_after_two_layers)
    run_carve(str(model), tmp_path / "resumed", options, calibration, compute=CPU, resume=True)
    whole, resumed = weights_of(tmp_path / "whole"), weights_of(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[key], resumed[key]) for key in whole)
