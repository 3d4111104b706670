"""CMoE's grouping of FFN neurons into a shared block and equal-width routed experts (pure numerics)."""

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cmoe.statistics import ActivationStats


@dataclass(frozen=True)
class Partition:
    """Which neurons go where: `shared` (sorted indices), `experts` (N_r, m) sorted per row,
    `representatives` (N_r,) one member per expert, used to build the router."""

    shared: torch.Tensor
    experts: torch.Tensor
    representatives: torch.Tensor

    @property
    def expert_size(self) -> int:
        return self.experts.shape[1]


def rank_by_rate(counts: torch.Tensor) -> torch.Tensor:
    """Neuron indices from most to least often marked; ties keep the lower index first."""
    return torch.sort(-counts.long(), stable=True).indices


def hamming_to_seeds(stats: ActivationStats, neurons: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """(n, N_r) L1 distances between binary mark columns: |c_i - c_s|_1 = cnt_i + cnt_s - 2 C_is."""
    counts = stats.counts.double().cpu()
    coact = stats.coactivation.cpu()[neurons][:, seeds].double()
    return counts[neurons].unsqueeze(1) + counts[seeds].unsqueeze(0) - 2.0 * coact


def balanced_assignment(cost: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """Labels (n,) putting exactly `cluster_size` rows in each column's cluster at minimal total cost.

    Solved as one square linear assignment: each cluster's column is repeated `cluster_size` times.
    """
    n, clusters = cost.shape
    if n != clusters * cluster_size:
        raise ValueError(f"{n} neurons do not fill {clusters} clusters of {cluster_size}")
    square = np.repeat(cost.numpy(), cluster_size, axis=1)
    rows, cols = linear_sum_assignment(square)
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = cols // cluster_size
    return torch.from_numpy(labels)


def nearest_to_centroid(stats: ActivationStats, members: torch.Tensor) -> int:
    """The member whose mark column is nearest (L1) to the cluster's mean column; lowest index on ties.

    For binary columns and centroid z: |c_i - z|_1 = sum(z) + cnt_i - (2/m) sum_{j in cluster} C_ij.
    """
    members = members.sort().values
    counts = stats.counts.double().cpu()[members]
    inner = stats.coactivation.cpu()[members][:, members].double().sum(dim=1)
    m = members.numel()
    distance = counts.sum() / m + counts - 2.0 * inner / m
    return int(members[int(torch.argmin(distance))])


def rank_by_contribution(stats: ActivationStats) -> torch.Tensor:
    """Neuron indices from largest to smallest mean output contribution; ties keep the lower index first."""
    return torch.sort(-stats.mean_contribution.cpu(), stable=True).indices


def cosine_similarities(gram: torch.Tensor) -> torch.Tensor:
    """Cosines between the contribution columns of the neurons, from their Gram matrix."""
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / norms.unsqueeze(0) / norms.unsqueeze(1)


def balanced_kmeans(cosine: torch.Tensor, seeds: torch.Tensor, cluster_size: int, iterations: int) -> torch.Tensor:
    """Labels (n,) of equal-size clusters of n unit vectors known only through their cosines.

    Starts with one balanced assignment to the seed vectors, then alternates: each cluster's mean
    direction, one balanced assignment by cosine to those means, until nothing moves or the
    iterations run out. Cosine to a cluster mean: sum_{k in S} K_ik / sqrt(sum_{k,l in S} K_kl).
    """
    cosine = cosine.double()
    labels = balanced_assignment(-cosine[:, seeds], cluster_size)
    for _ in range(iterations):
        members = torch.nn.functional.one_hot(labels, seeds.numel()).double()
        towards = cosine @ members
        spread = (members * towards).sum(dim=0).clamp_min(1e-30).sqrt()
        updated = balanced_assignment(-(towards / spread), cluster_size)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels


def most_active_member(stats: ActivationStats, members: torch.Tensor) -> int:
    """The member with the largest mean output contribution (or mark count when that was not collected)."""
    score = stats.mean_contribution.cpu() if stats.contribution_sum is not None else stats.counts.double().cpu()
    members = members.sort().values
    return int(members[int(torch.argmax(score[members]))])


SHARED_CHOICES = ("rate", "contribution")
GROUPINGS = ("hamming", "kmeans")
REPRESENTATIVES = ("centroid", "most-active")


def cmoe_partition(
    stats: ActivationStats,
    num_experts: int,
    num_shared: int,
    shared_by: str = "rate",
    grouping: str = "hamming",
    kmeans_iterations: int = 0,
    representative: str = "centroid",
) -> Partition:
    """The CMoE grouping. With the defaults, the reference: shared = most often marked neurons (plus
    any d_h mod N leftovers), routed experts = one balanced assignment of the rest to the most active
    remaining neurons (seeds) by Hamming cost, representative = member nearest its cluster's centroid.

    `shared_by="contribution"` ranks neurons by mean output contribution instead of mark rate;
    `grouping="kmeans"` clusters the contribution columns by cosine (balanced k-means, seeds as
    above); `representative="most-active"` picks each expert's most contributing member.
    """
    d_h = stats.num_neurons
    expert_size = d_h // num_experts
    num_routed = num_experts - num_shared
    shared_width = num_shared * expert_size + d_h % num_experts
    ranked = rank_by_rate(stats.counts.cpu()) if shared_by == "rate" else rank_by_contribution(stats)
    shared, rest = ranked[:shared_width], ranked[shared_width:]
    seeds = rest[:num_routed]
    if grouping == "hamming":
        labels = balanced_assignment(hamming_to_seeds(stats, rest, seeds), expert_size)
    else:
        cosine = cosine_similarities(stats.contribution_gram.cpu()[rest][:, rest])
        labels = balanced_kmeans(cosine, torch.arange(num_routed), expert_size, kmeans_iterations)
    experts = torch.stack([rest[labels == j].sort().values for j in range(num_routed)])
    pick = nearest_to_centroid if representative == "centroid" else most_active_member
    representatives = torch.tensor([pick(stats, row) for row in experts], dtype=torch.long)
    return Partition(shared=shared.sort().values, experts=experts, representatives=representatives)
