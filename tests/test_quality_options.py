"""The quality options (README, Options): each pinned on a small case that can be checked by hand."""

from dataclasses import replace
import json

import pytest
import torch
import torch.nn.functional as F

import cmoe
from cmoe.pipeline.blocks import build_block
from cmoe import Calibration, Compute, run_carve, run_profile
from cmoe.shape import MoEShape
from cmoe.numerics.router_fit import fit_linear_router
from cmoe.errors import CmoeError
from cmoe.recipes import CarveOptions
from cmoe.methods.cmoe import cmoe_partition
from cmoe.numerics.assignment import balanced_kmeans
from cmoe.numerics.grouping import cosine_similarities, most_active_member
from cmoe.pipeline.probe import ProbedMLP
from cmoe.numerics.statistics import OPTIONAL_STATISTICS, ActivationStats, mark_statistic, output_contribution

from conftest import TINYSTORIES_TRAIN, tiny_llama

CPU = Compute(device="cpu", dtype="float32", batch_size=2)


def stats_with_contributions(contribution: torch.Tensor, marks_k: int = 1) -> ActivationStats:
    stats = ActivationStats.empty(contribution.shape[1], extras=("contribution_sum", "contribution_gram"))
    stats.update(contribution.topk(marks_k, dim=1).indices, contribution)
    return stats


def test_output_contribution_and_mark_statistics_by_hand():
    hidden = torch.tensor([[1.0, -2.0, 0.5]])
    down_norms = torch.tensor([3.0, 1.0, 4.0])
    assert output_contribution(hidden, down_norms).tolist() == [[3.0, 2.0, 2.0]]
    weights = {"down_column_norms": down_norms}
    assert mark_statistic("raw", None, None, None, hidden, weights, F.silu).tolist() == [[1.0, -2.0, 0.5]]
    assert mark_statistic("contribution", None, None, None, hidden, weights, F.silu).tolist() == [[3.0, 2.0, 2.0]]
    with pytest.raises(ValueError):
        mark_statistic("energy", None, None, None, hidden, weights, F.silu)


def test_optional_statistics_stream_like_one_batch():
    torch.manual_seed(0)
    x, contribution = torch.randn(40, 5), torch.rand(40, 12)
    marks = contribution.topk(3, dim=1).indices
    whole = ActivationStats.empty(12, extras=OPTIONAL_STATISTICS, hidden_size=5)
    parts = ActivationStats.empty(12, extras=OPTIONAL_STATISTICS, hidden_size=5)
    whole.update(marks, contribution, x)
    for rows in torch.arange(40).split(7):
        parts.update(marks[rows], contribution[rows], x[rows])
    design = torch.cat([x, torch.ones(40, 1)], dim=1).double()
    assert torch.allclose(whole.input_gram, design.T @ design)
    assert torch.allclose(whole.contribution_gram, contribution.double().T @ contribution.double())
    for name in OPTIONAL_STATISTICS:
        assert torch.allclose(getattr(whole, name), getattr(parts, name)), name
    assert torch.allclose(whole.mean_contribution, contribution.double().mean(0))


def test_shared_by_contribution_and_most_active_representative():
    """Neuron 5 is marked most often but contributes little; 0 contributes most."""
    contribution = torch.tensor([[9.0, 1, 1, 1, 1, 2], [9.0, 1, 1, 1, 1, 2], [0.1, 1, 1, 1, 1, 2]] * 2)
    stats = ActivationStats.empty(6, extras=("contribution_sum",))
    stats.update(torch.tensor([[5], [5], [5], [5], [5], [0]]), contribution)
    assert cmoe_partition(stats, 6, 1).shared.tolist() == [5]
    assert cmoe_partition(stats, 6, 1, shared_by="contribution").shared.tolist() == [0]
    assert most_active_member(stats, torch.tensor([3, 0, 5])) == 0


def test_balanced_kmeans_finds_two_clean_groups_and_keeps_sizes_equal():
    """Neurons 0, 2, 4 fire on the first half of the tokens, 1, 3, 5 on the second."""
    contribution = torch.zeros(20, 6)
    contribution[:10, 0::2] = torch.rand(10, 3) + 0.5
    contribution[10:, 1::2] = torch.rand(10, 3) + 0.5
    stats = stats_with_contributions(contribution)
    labels = balanced_kmeans(cosine_similarities(stats.contribution_gram), torch.tensor([0, 1]), 3, 5)
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    partition = cmoe_partition(stats, 3, 1, shared_by="contribution", grouping="kmeans")
    assert sorted(partition.shared.tolist() + partition.experts.flatten().tolist()) == list(range(6))
    assert partition.experts.shape == (2, 2)


def _kmeans_objective(cosine: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over clusters of the norm of the members' summed unit vectors."""
    members = F.one_hot(labels).double()
    return float(((members * (cosine @ members)).sum(0)).sqrt().sum())


def test_balanced_kmeans_iterations_never_worsen_the_objective():
    """Four hidden groups of six neurons (neuron i in group i % 4), noisy; the seeds all come from
    group 0, so the first assignment is poor and the iterations must repair it."""
    torch.manual_seed(1)
    contribution = torch.rand(200, 24) * 0.3
    for group in range(4):
        contribution[group * 50 : (group + 1) * 50, group::4] += 1.0
    cosine = cosine_similarities(stats_with_contributions(contribution).contribution_gram)
    seeds = torch.tensor([0, 4, 8, 12])
    scores = [_kmeans_objective(cosine, balanced_kmeans(cosine, seeds, 6, n)) for n in (0, 1, 3, 10)]
    assert all(later >= earlier - 1e-9 for earlier, later in zip(scores, scores[1:]))
    assert scores[-1] > scores[0]
    labels = balanced_kmeans(cosine, seeds, 6, 10)
    assert torch.bincount(labels).tolist() == [6, 6, 6, 6]
    assert all(len(set(labels[group::4].tolist())) == 1 for group in range(4))


def test_linear_router_fit_recovers_an_exact_linear_target():
    """Expert 0 = neurons {0, 2}, expert 1 = {1}; contributions are exactly linear in x."""
    torch.manual_seed(0)
    x = torch.randn(500, 3)
    contribution = torch.stack([x[:, 0] + 1.0, 2 * x[:, 1], -x[:, 2] + 0.5], dim=1)
    stats = ActivationStats.empty(3, extras=("input_gram", "input_target", "contribution_sum"), hidden_size=3)
    stats.update(torch.zeros(500, 1, dtype=torch.long), contribution, x)
    weight, intercept = fit_linear_router(
        stats.input_gram, stats.input_target, torch.tensor([[0, 2], [1, 1]]), ridge=0.0
    )
    assert torch.allclose(weight, torch.tensor([[1.0, 0.0, -1.0], [0.0, 4.0, 0.0]], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(intercept, torch.tensor([1.5, 0.0], dtype=torch.float64), atol=1e-6)


def _quality_block(config: str, d_h: int = 48):
    mlp = tiny_llama(seed=0, intermediate_size=d_h).model.layers[0].mlp
    options = CarveOptions.resolved(MoEShape.parse(config), "quality")
    probe = ProbedMLP(mlp, 4, F.silu, statistic=options.statistic, extras=options.needed_statistics())
    with torch.no_grad():
        probe(torch.randn(4, 30, 32))
    partition = cmoe.METHODS["cmoe"](probe.stats, options)
    spec = options.shape.layer_spec(d_h, options.router)
    return mlp, build_block(mlp, partition, spec, "silu", probe.stats), partition


def test_quality_block_with_every_expert_on_equals_dense_and_covers_every_neuron():
    mlp, block, partition = _quality_block("S2A6E8")
    assert sorted(partition.shared.tolist() + partition.experts.flatten().tolist()) == list(range(48))
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        assert torch.allclose(block(x), mlp(x), atol=1e-5, rtol=0)
    assert type(block.router).__name__ == "LinearRouter"


def test_linear_router_picks_the_expert_with_the_largest_predicted_contribution():
    _, block, _ = _quality_block("S1A1E4")
    x = torch.randn(50, 32)
    predicted = block.router.proj(x)
    routing = block.router(x)
    assert torch.equal(routing.indices[:, 0], predicted.argmax(dim=1))
    assert torch.equal(routing.weights, torch.ones_like(routing.weights))


def test_quality_preset_carves_reloads_and_from_profile_checks_options(tiny_model_dir, tmp_path):
    calibration = Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)
    options = CarveOptions.resolved(MoEShape.parse("S1A2E8"), "quality")
    recipe = run_carve(str(tiny_model_dir), tmp_path / "seq", options, calibration, compute=CPU)
    assert recipe["preset"] == "quality" and recipe["router"] == "linear" and recipe["refit_down"] is True
    assert recipe["budget"] == "uniform" and recipe["active_experts_per_layer"] == [2, 2]
    ids = torch.randint(0, 2000, (2, 24))
    model = cmoe.load_carved(tmp_path / "seq")
    assert torch.equal(model(ids).logits, cmoe.load_carved(tmp_path / "seq")(ids).logits)
    assert "proj.bias" in dict(model.model.layers[0].mlp.router.named_parameters())

    run_profile(str(tiny_model_dir), tmp_path / "p.safetensors", calibration, compute=CPU)
    with pytest.raises(CmoeError, match="--no-refit-down"):
        run_carve(str(tiny_model_dir), tmp_path / "fp", options, None, tmp_path / "p.safetensors", CPU)
    without_refit = replace(options, refit_down=False)
    run_carve(str(tiny_model_dir), tmp_path / "fp", without_refit, None, tmp_path / "p.safetensors", CPU)
    assert cmoe.load_carved(tmp_path / "fp")(ids).logits.isfinite().all()
    raw = CarveOptions(MoEShape.parse("S1A2E8"), statistic="raw")
    with pytest.raises(CmoeError, match="--statistic raw"):
        run_carve(str(tiny_model_dir), tmp_path / "fp2", raw, None, tmp_path / "p.safetensors", CPU)


def test_a_profile_keeps_the_kmeans_gram_only_when_asked(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    from cmoe.io.profile_format import profile_bytes_per_layer
    from cmoe.numerics.statistics import OPTIONAL_STATISTICS, PROFILE_STATISTICS

    calibration = Calibration(str(TINYSTORIES_TRAIN), nsamples=2, seqlen=64, seed=0)
    kmeans = CarveOptions(MoEShape.parse("S1A2E8"), shared_by="contribution", grouping="kmeans")
    sizes = {}
    for gram, extras in ((False, PROFILE_STATISTICS), (True, OPTIONAL_STATISTICS)):
        path = tmp_path / f"gram-{gram}.safetensors"
        run_profile(str(tiny_model_dir), path, calibration, compute=CPU, gram=gram)
        with safe_open(str(path), framework="pt") as handle:
            names = {name.split(".", 2)[2] for name in handle.keys()}
            assert handle.get_tensor("layers.0.coactivation").dtype == torch.int32
            header = 8 + len(json.dumps({"__metadata__": handle.metadata()}))
        assert ("contribution_gram" in names) is gram
        sizes[gram] = path.stat().st_size - header
        assert abs(sizes[gram] - 2 * profile_bytes_per_layer(48, 32, extras)) < 4096, "payload as planned"
    assert sizes[True] - sizes[False] >= 2 * 8 * 48 * 48
    with pytest.raises(CmoeError, match="contribution_gram.*--gram"):
        run_carve(str(tiny_model_dir), tmp_path / "k1", kmeans, None, tmp_path / "gram-False.safetensors", CPU)
    run_carve(str(tiny_model_dir), tmp_path / "k2", kmeans, None, tmp_path / "gram-True.safetensors", CPU)
