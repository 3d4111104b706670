"""LLaMA-MoE's construction methods, the noisy top-k router and --rescale: sizes, coverage, seeds, numerics."""

import gc
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cmoe.io.recipe_file import read_recipe
from cmoe import carve_model
from cmoe import Calibration, Compute, run_carve
from cmoe.shape import MoEShape
from cmoe.methods import METHODS
from cmoe.errors import CmoeError
from cmoe.pipeline.gradients import gradient_importance, token_groups
from cmoe.methods.sharing_inner import sharing_inner_partition
from cmoe.methods.sharing_inter import sharing_inter_partition
from cmoe.numerics.assignment import balanced_kmeans_points
from cmoe.numerics.grouping import check_partition, random_split
from cmoe.numerics.importance import accumulate_importance, sharing_counts
from cmoe.modeling.modeling_cmoe import NoisyTopKRouter, cv_squared, finetuned_router_parameters, smooth_load
from cmoe.recipes import CarveOptions
from cmoe.numerics.grouping import Partition
from cmoe.numerics.statistics import ActivationStats
from test_cli import assert_one_line_error

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def stats_of(num_neurons: int) -> ActivationStats:
    """Mark statistics where neuron i was marked i times alone: enough to pick representatives."""
    stats = ActivationStats.empty(num_neurons)
    stats.counts = torch.arange(num_neurons)
    stats.coactivation = torch.diag(torch.arange(num_neurons))
    return stats


def kmeans_objective(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of squared distances of the points to the mean of their cluster: what k-means minimises."""
    points = points.double()
    return sum(
        float((points[labels == label] - points[labels == label].mean(0)).square().sum()) for label in labels.unique()
    )


def test_random_split_covers_every_neuron_once_and_is_reproducible_by_seed():
    leftovers, experts = random_split(50, 8, seed=3)
    assert experts.shape == (8, 6) and leftovers.numel() == 2
    assert torch.equal(torch.cat([leftovers, experts.reshape(-1)]).sort().values, torch.arange(50))
    again_leftovers, again = random_split(50, 8, seed=3)
    assert torch.equal(again, experts) and torch.equal(again_leftovers, leftovers)
    assert not torch.equal(random_split(50, 8, seed=4)[1], experts)


def test_clustering_on_real_up_rows_is_balanced_and_beats_random_on_its_objective():
    up = AutoModelForCausalLM.from_pretrained(TINYSTORIES_MODEL).model.layers[0].mlp.up_proj.weight.detach()
    labels = balanced_kmeans_points(up, 8, iterations=5, seed=0)
    assert torch.bincount(labels, minlength=8).tolist() == [48] * 8
    _, random_experts = random_split(up.shape[0], 8, seed=0)
    random_labels = torch.empty(up.shape[0], dtype=torch.long)
    for label, members in enumerate(random_experts):
        random_labels[members] = label
    assert kmeans_objective(up, labels) < 0.95 * kmeans_objective(up, random_labels)


def test_importance_accumulates_abs_h_times_grad_per_group_by_hand():
    hidden = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0], [-1.0, 0.0, 2.0]])
    grad = torch.tensor([[0.5, 0.5, -2.0], [-1.0, 2.0, 1.0], [4.0, 9.0, 0.25]])
    importance = torch.zeros(2, 3, dtype=torch.float64)
    accumulate_importance(importance, hidden, grad, torch.tensor([0, 1, 0]))
    # group 0: tokens 0 and 2: |0.5|+|-4| , |-1|+|0| , |-1|+|0.5| ; group 1: token 1: |-3|, |2|, |-1|
    assert importance.tolist() == [[4.5, 1.0, 1.5], [3.0, 2.0, 1.0]]


def test_gradient_pass_matches_autograd_of_a_per_token_neuron_scale():
    """|h * dL/dh| per token equals |dL/dalpha| for h scaled by alpha = 1 per token and neuron."""
    model = tiny_llama(intermediate_size=24)
    windows = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    importance = gradient_importance(model, windows, num_groups=3, seed=0, batch_size=2, device=torch.device("cpu"))
    groups = token_groups(windows, model.get_input_embeddings().weight.detach(), 3, 0).reshape(-1)

    down = model.model.layers[1].mlp.down_proj
    alpha = torch.ones(2, 12, 24, requires_grad=True)
    handle = down.register_forward_pre_hook(lambda module, args: (args[0] * alpha,))
    try:
        model(input_ids=windows, labels=windows).loss.backward()
    finally:
        handle.remove()
    expected = torch.zeros(3, 24, dtype=torch.float64).index_add_(0, groups, alpha.grad.reshape(-1, 24).abs().double())
    assert importance.shape == (2, 3, 24)
    torch.testing.assert_close(importance[1], expected, rtol=1e-4, atol=1e-9)
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_gradient_pass_memory_does_not_grow_with_the_number_of_batches():
    def live_tensors() -> int:
        gc.collect()
        return sum(1 for item in gc.get_objects() if issubclass(type(item), torch.Tensor))

    model = tiny_llama(intermediate_size=24)
    windows = torch.randint(0, 97, (6, 12), generator=torch.Generator().manual_seed(0))
    gradient_importance(model, windows[:1], num_groups=3, seed=0, batch_size=1, device=torch.device("cpu"))
    before = live_tensors()
    gradient_importance(model, windows, num_groups=3, seed=0, batch_size=1, device=torch.device("cpu"))
    assert live_tensors() == before


def test_sharing_inner_takes_each_groups_top_neurons_and_may_overlap():
    importance = torch.tensor([[9.0, 8, 1, 0, 0, 7, 0], [9.0, 0, 8, 7, 0, 0, 0], [0.0, 0, 0, 1, 9, 8, 7]])
    partition = sharing_inner_partition(stats_of(7), importance, expert_size=2)
    assert partition.shared.numel() == 1  # 7 - 3 x 2 leftover: largest total normalised importance
    assert partition.shared.tolist() == [0]
    assert partition.experts.tolist() == [[1, 5], [2, 3], [4, 5]]
    check_partition(partition, 7, overlapping=True)
    with pytest.raises(ValueError):
        check_partition(partition, 7, overlapping=False)


def test_sharing_inter_sets_the_most_shared_neurons_apart_and_splits_the_rest_once():
    importance = torch.tensor([[9.0, 8, 1, 0, 0, 7, 2, 0], [9.0, 0, 8, 7, 0, 6, 0, 1], [5.0, 0, 0, 1, 9, 8, 7, 0]])
    assert sharing_counts(importance, 3).tolist() == [2, 1, 1, 1, 1, 2, 1, 0]
    partition = sharing_inter_partition(stats_of(8), importance, expert_size=2, shared_width=2)
    assert partition.shared.tolist() == [0, 5]
    assert partition.experts.tolist() == [[1, 7], [2, 3], [4, 6]]
    check_partition(partition, 8, overlapping=False)


def carve_tiny(method: str, config: str, **options):
    model = tiny_llama(intermediate_size=50)
    windows = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    carve_options = CarveOptions(MoEShape.parse(config), ka=4, method=method, **options)
    carve_options.check(50, model.config.num_hidden_layers)
    with torch.no_grad():
        reference = model(windows).logits
        carved = carve_model(model, windows, carve_options, 2)
    return carved, reference, windows


@pytest.mark.parametrize(
    "method,config",
    [("random", "S0A2E4"), ("clustering", "S0A2E4"), ("sharing-inter", "S1A1E4"), ("sharing-inter", "S0A1E4")],
)
def test_disjoint_methods_hold_every_neuron_once_so_all_experts_on_is_the_dense_model(method, config):
    carved, reference, windows = carve_tiny(method, config)
    spec = carved.config.cmoe_layers[0]
    assert spec["expert_size"] == 12 and spec["shared_size"] == MoEShape.parse(config).shared * 12 + 2
    for layer in carved.model.layers:
        layer.mlp.top_k = layer.mlp.router.top_k = layer.mlp.num_experts
    with torch.no_grad():
        torch.testing.assert_close(carved(windows).logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["random", "clustering", "sharing-inter"])
def test_disjoint_methods_on_real_weights_with_every_expert_on_give_the_dense_model(method):
    model = AutoModelForCausalLM.from_pretrained(TINYSTORIES_MODEL).eval()
    windows = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    options = CarveOptions(MoEShape.parse("S0A2E8"), method=method)
    with torch.no_grad():
        reference = model(windows).logits
        carved = carve_model(model, windows, options, 2)
        for layer in carved.model.layers:
            assert (
                layer.mlp.shared is None
                and [expert.up_proj.weight.shape[0] for expert in layer.mlp.experts] == [48] * 8
            )
            layer.mlp.top_k = layer.mlp.router.top_k = 8
        torch.testing.assert_close(carved(windows).logits, reference, rtol=1e-4, atol=1e-4)


def test_sharing_inner_builds_equal_overlapping_experts_on_real_weights():
    model = AutoModelForCausalLM.from_pretrained(TINYSTORIES_MODEL).eval()
    windows = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    options = CarveOptions(MoEShape.parse("S0A2E8"), method="sharing-inner")
    with torch.no_grad():
        carved = carve_model(model, windows, options, 2)
    for layer in carved.model.layers:
        assert layer.mlp.shared is None and len(layer.mlp.experts) == 8
        assert all(expert.up_proj.weight.shape == (48, 128) for expert in layer.mlp.experts)


def test_random_method_gives_the_same_model_for_the_same_seed_and_another_for_another():
    first, _, windows = carve_tiny("random", "S0A2E4", seed=5)
    second, _, _ = carve_tiny("random", "S0A2E4", seed=5)
    third, _, _ = carve_tiny("random", "S0A2E4", seed=6)
    first_state, second_state, third_state = first.state_dict(), second.state_dict(), third.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    assert not all(torch.equal(first_state[name], third_state[name]) for name in first_state)


def test_rescale_folds_n_over_k_into_the_routed_down_projections_only():
    plain, _, _ = carve_tiny("random", "S0A1E4")
    scaled, _, _ = carve_tiny("random", "S0A1E4", rescale=True)
    for before, after in zip(plain.model.layers, scaled.model.layers):
        torch.testing.assert_close(after.mlp.experts[1].down_proj.weight, 4.0 * before.mlp.experts[1].down_proj.weight)
        torch.testing.assert_close(after.mlp.shared.down_proj.weight, before.mlp.shared.down_proj.weight)


def test_registry_declares_what_each_method_needs():
    assert {name for name, method in METHODS.items() if method.needs_gradients} == {"sharing-inner", "sharing-inter"}
    assert [name for name, method in METHODS.items() if method.overlapping] == ["sharing-inner"]
    with pytest.raises(CmoeError, match="builds no shared expert"):
        CarveOptions(MoEShape.parse("S1A1E8"), method="random").check(64)
    with pytest.raises(CmoeError, match="not with --budget adaptive"):
        CarveOptions(MoEShape.parse("S1A1E8"), rescale=True, budget="adaptive").check(64)
    with pytest.raises(ValueError):
        check_partition(
            Partition(torch.tensor([0]), torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 2])), 4, overlapping=False
        )


def skewed_router() -> tuple[NoisyTopKRouter, torch.Tensor]:
    """A router whose gate sends every token of a skewed input to the same experts."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(hidden_size=16, num_experts=6, top_k=2, hidden_act="silu")
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.1)
        router.gate.weight[0] += 1.0
        router.gate.weight[1] += 0.8
        router.noise.weight.zero_()
    x = torch.randn(256, 16) * 0.3 + 1.0
    return router, x


def test_noisy_topk_balance_loss_falls_when_its_gate_is_trained():
    router, x = skewed_router()
    router.train()
    optimizer = torch.optim.Adam(router.parameters(), lr=0.05)

    def mean_loss() -> float:
        with torch.no_grad():
            losses = []
            for _ in range(8):
                router(x)
                losses.append(float(router.balance_loss))
            return sum(losses) / len(losses)

    before = mean_loss()
    for _ in range(60):
        router(x)
        optimizer.zero_grad()
        router.balance_loss.backward()
        optimizer.step()
    after = mean_loss()
    assert before > 1.0 and after < 0.25 * before, (before, after)


def test_smooth_load_is_the_chance_of_staying_in_the_top_k_when_only_ones_own_noise_is_redrawn():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 5, generator=generator)
    std = torch.rand(3, 5, generator=generator) + 0.2
    noisy = clean + torch.randn(3, 5, generator=generator) * std
    draws = 200_000
    expected = torch.zeros(5)
    for expert in range(5):
        redrawn = noisy.unsqueeze(0).repeat(draws, 1, 1)
        redrawn[:, :, expert] = clean[:, expert] + torch.randn(draws, 3, generator=generator) * std[:, expert]
        stays = (redrawn.topk(2, dim=-1).indices == expert).any(dim=-1)
        expected[expert] = stays.float().mean(dim=0).sum()
    torch.testing.assert_close(smooth_load(clean, noisy, std, top_k=2), expected, atol=0.01, rtol=0)


def test_noisy_topk_in_eval_mode_is_deterministic_softmax_over_the_selected():
    router, x = skewed_router()
    router.eval()
    first, second = router(x), router(x)
    assert router.balance_loss is None
    assert torch.equal(first.indices, second.indices)
    torch.testing.assert_close(first.weights.sum(dim=-1), torch.ones(x.shape[0]))
    assert cv_squared(torch.ones(5)) == 0


@pytest.fixture(scope="module")
def noisy_carved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noisy") / "S0A2E4"
    options = CarveOptions(MoEShape.parse("S0A2E4"), method="random", router="noisy-topk", rescale=True)
    run_carve(
        str(TINYSTORIES_MODEL),
        out,
        options,
        Calibration(str(TINYSTORIES_TRAIN), nsamples=2, seqlen=64),
        compute=Compute("cpu", "float32", 2),
    )
    return out


def test_noisy_carve_records_its_recipe_and_reloads(noisy_carved):
    recipe = read_recipe(noisy_carved)
    assert recipe["method"] == "random" and recipe["router"] == "noisy-topk" and recipe["rescale"] is True
    model = AutoModelForCausalLM.from_pretrained(noisy_carved).eval()
    router = model.model.layers[0].mlp.router
    assert isinstance(router, torch.nn.Module) and type(router).__name__ == "NoisyTopKRouter"
    assert torch.count_nonzero(router.noise.weight) == 0 and torch.count_nonzero(router.gate.weight) > 0
    assert not torch.equal(router.gate.weight, model.model.layers[1].mlp.router.gate.weight)
    card = (noisy_carved / "README.md").read_text()
    assert "| construction method | random, routed outputs rescaled by n/k |" in card and "random start" in card


def test_finetune_collects_the_noisy_balance_loss_with_a_gradient_to_the_gate(noisy_carved):
    from cmoe.finetune import RoutingMeter

    model = AutoModelForCausalLM.from_pretrained(noisy_carved).train()
    meter = RoutingMeter(model)
    meter.active = True
    model(
        input_ids=torch.randint(
            0, model.config.text_config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)
        )
    )
    balance_loss = meter.take_balance_loss()
    balance_loss.backward()
    assert balance_loss > 0
    assert all(layer.mlp.router.gate.weight.grad.abs().sum() > 0 for layer in model.model.layers)


def test_lora_finetune_trains_the_noisy_gate_and_noise_but_not_the_analytic_rows(noisy_carved, tmp_path):
    from cmoe.finetune import FinetuneOptions, run_finetune

    train = tmp_path / "train.txt"
    train.write_text(TINYSTORIES_TRAIN.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    options = FinetuneOptions(nsamples=4, seqlen=64, batch_size=2, checkpoint_every=0, eval_windows=2)
    run_finetune(str(noisy_carved), [str(train)], tmp_path / "tuned", options, device="cpu")
    before = AutoModelForCausalLM.from_pretrained(noisy_carved).model.layers[0].mlp.router
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").model.layers[0].mlp.router
    assert not torch.allclose(before.gate.weight, after.gate.weight)
    assert torch.count_nonzero(after.noise.weight) > 0
    analytic = AutoModelForCausalLM.from_pretrained(TINYSTORIES_MODEL)
    carved = carve_model(analytic, torch.randint(0, 97, (2, 32)), CarveOptions(MoEShape.parse("S1A1E4")), 2)
    names = {id(parameter) for parameter in finetuned_router_parameters(carved)}
    assert {name for name, parameter in carved.named_parameters() if id(parameter) in names} == {
        f"model.layers.{index}.mlp.router.scale" for index in range(len(carved.model.layers))
    }


M = str(TINYSTORIES_MODEL)
CAL = ["--data", str(TINYSTORIES_TRAIN), "--nsamples", "2", "--seqlen", "64", "--device", "cpu"]


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--method", "magic"],
            "--method magic: expected one of cmoe, random, clustering, sharing-inner, sharing-inter",
        ),
        (["--router", "magic"], "--router magic: expected one of analytic, linear, linear-gate, noisy-topk"),
        (["--method", "random", "--config", "S1A1E8"], "--method random builds no shared expert: use S0"),
        (["--method", "sharing-inner", "--config", "S0A2E8", "--profile", "{out}.profile"], "needs a gradient pass"),
        (["--rescale", "--budget", "adaptive"], "not with --budget adaptive"),
    ],
)
def test_bad_method_options_give_one_line(capsys, tmp_path, args, expected):
    out = str(tmp_path / "out")
    (tmp_path / "out.profile").write_text("")
    filled = [arg.format(out=out) for arg in args]
    assert_one_line_error(capsys, ["carve", M, "-o", out, *CAL, *filled], expected)


def test_options_replace_keeps_method_fields():
    options = replace(CarveOptions(MoEShape.parse("S0A2E8")), method="clustering", seed=3)
    assert options.to_dict()["method"] == "clustering" and options.to_dict()["seed"] == 3
