"""The pure numerics of CMoE on cases small enough to check by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from cmoe.shape import MoEShape
from cmoe.routers.analytic import analytic_router_weights
from cmoe.errors import CmoeError
from cmoe.modeling.modeling_cmoe import AnalyticRouter
from cmoe.methods.cmoe import cmoe_partition
from cmoe.numerics.assignment import balanced_assignment
from cmoe.numerics.grouping import Partition, hamming_to_seeds, nearest_to_centroid
from cmoe.numerics.statistics import ActivationStats, coactivation_counts, normalized_swiglu_state, top_k_marks

# Six tokens, six neurons, K_a = 2: the marked neurons of each token.
HAND_MARKS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 4], [2, 5], [0, 4]])


def hand_stats() -> ActivationStats:
    stats = ActivationStats.empty(6)
    stats.update(HAND_MARKS)
    return stats


def test_marks_counts_and_coactivation_by_hand():
    stats = hand_stats()
    assert stats.tokens == 6
    assert stats.counts.tolist() == [4, 2, 2, 1, 2, 1]
    assert torch.allclose(stats.rates, torch.tensor([4, 2, 2, 1, 2, 1], dtype=torch.float64) / 6)
    assert torch.equal(stats.coactivation.diagonal(), stats.counts)
    assert stats.coactivation[0, 1] == 1 and stats.coactivation[1, 4] == 1 and stats.coactivation[2, 4] == 0
    assert torch.equal(stats.coactivation, stats.coactivation.T)


def test_top_k_marks_picks_largest_magnitudes():
    state = torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 0.0, -0.2, -4.0]])
    assert sorted(top_k_marks(state, 2)[0].tolist()) == [1, 2]
    assert sorted(top_k_marks(state, 2)[1].tolist()) == [0, 3]


def test_coactivation_sparse_and_dense_paths_equal_explicit_product():
    torch.manual_seed(0)
    marks = torch.stack([torch.randperm(12)[:5] for _ in range(40)])
    explicit = torch.zeros(40, 12)
    explicit.scatter_(1, marks, 1.0)
    expected = (explicit.T @ explicit).long()
    assert torch.equal(coactivation_counts(marks, 12), expected)  # 25 > 12: dense path
    assert torch.equal(
        coactivation_counts(marks[:, :3], 12),
        (lambda a: (a.T @ a).long())(torch.zeros(40, 12).scatter_(1, marks[:, :3], 1.0)),
    )  # 9 <= 12: bincount path


def test_streaming_batches_equal_one_pass():
    torch.manual_seed(1)
    marks = torch.stack([torch.randperm(20)[:3] for _ in range(50)])
    whole, parts = ActivationStats.empty(20), ActivationStats.empty(20)
    whole.update(marks)
    for chunk in marks.split(7):
        parts.update(chunk)
    assert parts.tokens == whole.tokens
    assert torch.equal(parts.counts, whole.counts) and torch.equal(parts.coactivation, whole.coactivation)


def test_normalized_state_matches_normalizing_inputs_and_rows():
    torch.manual_seed(2)
    x, w_gate, w_up = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6, 8)
    expected = F.silu(F.normalize(x) @ F.normalize(w_gate).T) * (F.normalize(x) @ F.normalize(w_up).T)
    got = normalized_swiglu_state(x, x @ w_gate.T, x @ w_up.T, w_gate.norm(dim=1), w_up.norm(dim=1), F.silu)
    assert torch.allclose(got, expected, atol=1e-6)


def test_hand_partition_shared_seeds_assignment_and_representatives():
    """Ranking 0(4) 1(2) 2(2) 4(2) 3(1) 5(1): shared {0,1}; seeds 2 and 4; Hamming costs put 5 with 2
    (cost 1) and 3 with 4 (cost 3), total 4 against 6 the other way; both clusters tie on the centroid
    distance, so the lower index represents them."""
    partition = cmoe_partition(hand_stats(), num_experts=3, num_shared=1)
    assert partition.shared.tolist() == [0, 1]
    assert partition.experts.tolist() == [[2, 5], [3, 4]]
    assert partition.representatives.tolist() == [2, 3]
    costs = hamming_to_seeds(hand_stats(), torch.tensor([2, 4, 3, 5]), torch.tensor([2, 4]))
    assert costs.tolist() == [[0, 4], [4, 0], [3, 3], [1, 3]]


def test_representative_is_nearest_to_centroid():
    """Columns a={t0,t1}, b={t0}, c={t0,t2}: centroid (1, 1/3, 1/3); L1 distances 1, 2/3, 1 -> b."""
    stats = ActivationStats.empty(3)
    for token in ([0, 1, 2], [0], [2]):
        marks = torch.tensor(token)
        stats.tokens += 1
        stats.counts[marks] += 1
        stats.coactivation[marks.unsqueeze(1), marks.unsqueeze(0)] += 1
    assert nearest_to_centroid(stats, torch.tensor([0, 1, 2])) == 1


def test_balanced_assignment_fills_every_cluster_exactly():
    torch.manual_seed(3)
    labels = balanced_assignment(torch.rand(12, 4, dtype=torch.float64), cluster_size=3)
    assert torch.bincount(labels, minlength=4).tolist() == [3, 3, 3, 3]


def square_expansion(cost: torch.Tensor, cluster_size: int) -> tuple[float, torch.Tensor]:
    """The former solver, kept as the reference: SciPy's assignment on each column repeated `cluster_size` times."""
    square = np.repeat(cost.numpy(), cluster_size, axis=1)
    rows, cols = linear_sum_assignment(square)
    labels = np.empty(cost.shape[0], dtype=np.int64)
    labels[rows] = cols // cluster_size
    return float(square[rows, cols].sum()), torch.from_numpy(labels)


def hamming_costs(clusters: int, cluster_size: int, tokens: int, seed: int) -> torch.Tensor:
    """The reference's costs: top-K_a marks per token (10% of the neurons), routed neurons vs the most
    active neurons as seeds; few tokens make many ties."""
    d_h = clusters * (cluster_size + 1)
    generator = torch.Generator().manual_seed(seed)
    stats = ActivationStats.empty(d_h)
    stats.update(torch.stack([torch.randperm(d_h, generator=generator)[: d_h // 10] for _ in range(tokens)]))
    order = torch.argsort(stats.counts, descending=True, stable=True)
    return hamming_to_seeds(stats, order[clusters:], order[:clusters])


ASSIGNMENT_COSTS = {
    "random-float": lambda: torch.rand(96, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
    "tie-heavy-integer": lambda: torch.randint(0, 3, (96, 6), generator=torch.Generator().manual_seed(1)).double(),
    "all-equal": lambda: torch.ones(40, 5, dtype=torch.float64),
    "hamming": lambda: hamming_costs(clusters=6, cluster_size=16, tokens=256, seed=2),
    "hamming-few-tokens": lambda: hamming_costs(clusters=4, cluster_size=30, tokens=12, seed=3),
}


@pytest.mark.parametrize("name", ASSIGNMENT_COSTS)
def test_balanced_assignment_reaches_the_square_expansion_optimum(name):
    cost = ASSIGNMENT_COSTS[name]()
    clusters = cost.shape[1]
    size = cost.shape[0] // clusters
    labels = balanced_assignment(cost, size)
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=clusters).tolist() == [size] * clusters
    total = float(cost[torch.arange(cost.shape[0]), labels].sum())
    assert total == pytest.approx(square_expansion(cost, size)[0], rel=1e-12, abs=1e-9)
    assert torch.equal(balanced_assignment(cost.clone(), size), labels)  # deterministic among tied optima


def test_balanced_assignment_with_a_unique_optimum_gives_scipys_labels():
    generator = torch.Generator().manual_seed(4)
    planted = torch.randperm(60, generator=generator) % 5
    cost = 1.0 + torch.rand(60, 5, generator=generator, dtype=torch.float64)
    cost[torch.arange(60), planted] = 0.0  # every other assignment costs at least 1 more
    labels = balanced_assignment(cost, 12)
    assert torch.equal(labels, planted)
    assert torch.equal(labels, square_expansion(cost, 12)[1])


def test_balanced_assignment_rejects_sizes_that_do_not_fill_the_clusters():
    with pytest.raises(ValueError, match="do not fill"):
        balanced_assignment(torch.zeros(10, 3, dtype=torch.float64), 3)
    assert balanced_assignment(torch.zeros(0, 0, dtype=torch.float64), 4).numel() == 0


@pytest.mark.parametrize("d_h,experts,shared", [(48, 8, 1), (50, 8, 3), (37, 5, 0), (64, 4, 2)])
def test_every_neuron_in_exactly_one_expert(d_h, experts, shared):
    torch.manual_seed(d_h)
    stats = ActivationStats.empty(d_h)
    stats.update(torch.stack([torch.randperm(d_h)[:4] for _ in range(64)]))
    partition = cmoe_partition(stats, num_experts=experts, num_shared=shared)
    width = d_h // experts
    assert partition.experts.shape == (experts - shared, width)
    assert partition.shared.numel() == shared * width + d_h % experts  # leftovers join the shared block
    everything = torch.cat([partition.shared, partition.experts.reshape(-1)])
    assert sorted(everything.tolist()) == list(range(d_h))
    for row, rep in zip(partition.experts, partition.representatives):
        assert rep in row


class LlamaMLPStandIn(torch.nn.Module):
    """Just the gate/up projections a router builder reads."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor):
        super().__init__()
        self.gate_proj = torch.nn.Linear(w_gate.shape[1], w_gate.shape[0], bias=False)
        self.up_proj = torch.nn.Linear(w_up.shape[1], w_up.shape[0], bias=False)
        self.gate_proj.weight.data, self.up_proj.weight.data = w_gate, w_up


def test_analytic_router_by_hand():
    """Representatives 2 and 3 with gate rows (3,4), (0,2) and up rows (1,0), (0,-5); x = (1,1):
    scores |silu(1.4) * 1| and |silu(1) * -1|."""
    w_gate = torch.zeros(4, 2)
    w_up = torch.zeros(4, 2)
    w_gate[2], w_gate[3] = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])
    w_up[2], w_up[3] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, -5.0])
    partition = Partition(torch.tensor([0, 1]), torch.tensor([[2], [3]]), torch.tensor([2, 3]))
    router = AnalyticRouter(hidden_size=2, num_experts=2, top_k=1, hidden_act="silu")
    dense = LlamaMLPStandIn(w_gate, w_up)
    router.load_state_dict(
        {**analytic_router_weights(dense, partition, None), "scale": torch.zeros(2), "bias": torch.zeros(2)}
    )
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    s0, s1 = silu(1.4), silu(1.0)
    p0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
    routing = router(torch.tensor([[1.0, 1.0]]))
    assert routing.probs[0].tolist() == pytest.approx([p0, 1 - p0], abs=1e-6)
    assert routing.indices.tolist() == [[0]] and routing.weights.tolist() == [[1.0]]
    router.scale.data = torch.tensor([0.5, 0.0])
    assert router(torch.tensor([[1.0, 1.0]])).weights.item() == pytest.approx(1 + 0.5 * p0, abs=1e-6)
    router.bias.copy_(torch.tensor([0.0, 0.3]))  # p + b = (0.597, 0.703): the bias steers selection only
    steered = router(torch.tensor([[1.0, 1.0]]))
    assert steered.indices.tolist() == [[1]]
    assert steered.probs[0, 0].item() == pytest.approx(p0, abs=1e-6)


@pytest.mark.parametrize(
    "text,error",
    [
        ("S3A3E8", None),
        ("s1a1e8", None),
        ("S0A2E8", None),
        ("S4A5E8", "exceeds"),
        ("S1A0E8", "active"),
        ("S0A0E0", "experts must be positive"),
        ("3-3-8", "expected S"),
        ("S-1A1E8", "expected S"),
    ],
)
def test_shape_parsing_and_validation(text, error):
    if error is None:
        assert MoEShape.parse(text).name == text.upper()
    else:
        with pytest.raises(CmoeError, match=error):
            MoEShape.parse(text)


def test_shape_cannot_exceed_ffn_width():
    with pytest.raises(CmoeError, match="exceed the FFN width"):
        MoEShape.parse("S1A1E64").validated(intermediate_size=48)


def test_layer_spec_puts_leftovers_in_shared():
    spec = MoEShape.parse("S1A1E8").layer_spec(50, "analytic")
    assert spec.to_dict() == {
        "shared_size": 6 + 2,
        "num_experts": 7,
        "expert_size": 6,
        "top_k": 1,
        "router": "analytic",
        "gating": "cmoe",
    }
