"""LLaMA-MoE's expert construction methods (Zhu et al. 2024, section 2 and appendix C), as pure numerics.

Independent-Random and Independent-Clustering split the FFN neurons into disjoint equal experts;
Sharing-Inner and Sharing-Inter read importance vectors `v_g = sum |h * dL/dh|` over the tokens of
each pre-clustered data group g (one group per routed expert; see `cmoe.gradients`).
"""

import torch

from cmoe.partition import Partition, balanced_assignment, nearest_to_centroid, rank_by_rate
from cmoe.statistics import ActivationStats


def layer_seed(seed: int, layer: int) -> int:
    """One reproducible seed per (run seed, layer), so layers are split independently."""
    return seed * 1_000_003 + layer


def random_split(num_neurons: int, num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(leftovers, experts (N, m)): a seeded random equal partition; the d_h mod N leftovers are set apart."""
    permutation = torch.randperm(num_neurons, generator=torch.Generator().manual_seed(seed))
    leftover = num_neurons % num_experts
    experts = permutation[leftover:].view(num_experts, -1).sort(dim=1).values
    return permutation[:leftover].sort().values, experts


def squared_distances(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, c) squared Euclidean distances, in float64."""
    points, centroids = points.double(), centroids.double()
    return (points.square().sum(1, keepdim=True) - 2 * points @ centroids.T + centroids.square().sum(1)).clamp_min(0)


def kmeans_objective(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of squared distances of the points to the mean of their cluster: what k-means minimises."""
    points = points.double()
    total = 0.0
    for label in labels.unique():
        members = points[labels == label]
        total += float((members - members.mean(0)).square().sum())
    return total


def balanced_kmeans_points(points: torch.Tensor, clusters: int, iterations: int, seed: int) -> torch.Tensor:
    """Labels (n,) of `clusters` equal-size clusters of the rows of `points` (n divisible by `clusters`).

    Seeded random distinct points start as centroids; each pass is one balanced assignment by squared
    distance (exact, see `balanced_assignment`) and a centroid update, until nothing moves.
    """
    size = points.shape[0] // clusters
    start = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))[:clusters]
    labels = balanced_assignment(squared_distances(points, points[start]), size)
    for _ in range(iterations):
        centroids = torch.stack([points[labels == j].double().mean(0) for j in range(clusters)])
        updated = balanced_assignment(squared_distances(points, centroids), size)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels


def accumulate_importance(importance: torch.Tensor, hidden: torch.Tensor, grad: torch.Tensor, groups: torch.Tensor) -> None:
    """In place: importance[g] += sum over the tokens t of group g of |h_t * dL/dh_t| (first-order
    Taylor estimate of the loss change when a neuron is removed). `hidden`, `grad`: (tokens, d_h)."""
    contribution = (hidden.float() * grad.float()).abs()
    importance.index_add_(0, groups.to(importance.device), contribution.to(importance.dtype))


def normalized_importance(importance: torch.Tensor) -> torch.Tensor:
    """Each group's vector divided by its sum, so large groups do not outweigh small ones."""
    importance = importance.double()
    return importance / importance.sum(dim=1, keepdim=True).clamp_min(1e-300)


def top_neurons(scores: torch.Tensor, count: int, exclude: torch.Tensor) -> torch.Tensor:
    """The `count` highest-scoring neurons not in `exclude`, sorted by index (ties: lower index first)."""
    scores = scores.double().clone()
    scores[exclude] = -torch.inf
    return torch.sort(-scores, stable=True).indices[:count].sort().values


def complement(neurons: torch.Tensor, num_neurons: int) -> torch.Tensor:
    """The sorted neuron indices not in `neurons`."""
    return torch.arange(num_neurons)[~torch.isin(torch.arange(num_neurons), neurons)]


def sharing_counts(importance: torch.Tensor, top: int) -> torch.Tensor:
    """(d_h,) in how many groups' top-`top` neurons (by importance) each neuron appears."""
    ranked = torch.sort(-importance.double(), dim=1, stable=True).indices[:, :top]
    return torch.bincount(ranked.reshape(-1), minlength=importance.shape[1])


def rank_by_sharing(importance: torch.Tensor, top: int) -> torch.Tensor:
    """Neurons from most to least shared across the groups' top sets; ties by total normalised importance."""
    counts = sharing_counts(importance, top).double()
    total = normalized_importance(importance).sum(0)
    key = counts * (total.max() + 1) + total
    return torch.sort(-key, stable=True).indices


def _with_representatives(stats: ActivationStats, shared: torch.Tensor, experts: torch.Tensor) -> Partition:
    representatives = torch.tensor([nearest_to_centroid(stats, row) for row in experts], dtype=torch.long)
    return Partition(shared=shared.sort().values, experts=experts, representatives=representatives)


def random_partition(stats: ActivationStats, num_experts: int, seed: int) -> Partition:
    """Independent-Random: a seeded equal random split (leftover neurons of d_h mod N go to the shared block)."""
    leftovers, experts = random_split(stats.num_neurons, num_experts, seed)
    return _with_representatives(stats, leftovers, experts)


def clustering_partition(
    stats: ActivationStats, up_weight: torch.Tensor, num_experts: int, iterations: int, seed: int
) -> Partition:
    """Independent-Clustering: balanced k-means on the rows of W_up; the d_h mod N most often marked
    neurons form the (leftover) shared block."""
    leftover = stats.num_neurons % num_experts
    ranked = rank_by_rate(stats.counts.cpu())
    shared, rest = ranked[:leftover], ranked[leftover:].sort().values
    labels = balanced_kmeans_points(up_weight.detach().cpu()[rest], num_experts, iterations, seed)
    experts = torch.stack([rest[labels == j] for j in range(num_experts)])
    return _with_representatives(stats, shared, experts)


def sharing_inner_partition(stats: ActivationStats, importance: torch.Tensor, expert_size: int) -> Partition:
    """Sharing-Inner: expert g = the `expert_size` most important neurons for data group g (experts may
    overlap; neurons important to no group are left out). The d_h mod N neurons of largest total
    normalised importance form the (leftover) shared block."""
    leftover = stats.num_neurons - importance.shape[0] * expert_size
    shared = torch.sort(-normalized_importance(importance).sum(0), stable=True).indices[:leftover]
    experts = torch.stack([top_neurons(row, expert_size, shared) for row in importance])
    return _with_representatives(stats, shared, experts)


def sharing_inter_partition(stats: ActivationStats, importance: torch.Tensor, expert_size: int, shared_width: int) -> Partition:
    """Sharing-Inter: the `shared_width` neurons found in most groups' top sets form the shared
    (residual) block; the rest are split into equal disjoint experts by one balanced assignment that
    maximises each neuron's normalised importance for its expert's group."""
    shared = rank_by_sharing(importance, expert_size)[:shared_width]
    rest = complement(shared, stats.num_neurons)
    cost = -normalized_importance(importance)[:, rest].T
    labels = balanced_assignment(cost, expert_size)
    experts = torch.stack([rest[labels == j] for j in range(importance.shape[0])])
    return _with_representatives(stats, shared, experts)


def check_partition(partition: Partition, num_neurons: int, overlapping: bool) -> None:
    """Every neuron exactly once (disjoint methods), or at least no neuron twice in one expert and none
    both shared and routed (overlapping methods)."""
    routed = partition.experts.reshape(-1)
    if not overlapping:
        every = torch.cat([partition.shared, routed]).sort().values
        if not torch.equal(every, torch.arange(num_neurons)):
            raise ValueError("the partition does not hold every neuron exactly once")
        return
    if any(row.unique().numel() != row.numel() for row in partition.experts):
        raise ValueError("an expert holds a neuron twice")
    if torch.isin(partition.shared, routed).any():
        raise ValueError("a shared neuron is also routed")
