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


def cmoe_partition(stats: ActivationStats, num_experts: int, num_shared: int) -> Partition:
    """The reference grouping: shared = most often marked neurons (plus any d_h mod N leftovers),
    routed experts = one balanced assignment of the rest to the most active remaining neurons
    (seeds) by Hamming cost, representative = member nearest its cluster's centroid."""
    d_h = stats.num_neurons
    expert_size = d_h // num_experts
    num_routed = num_experts - num_shared
    shared_width = num_shared * expert_size + d_h % num_experts
    ranked = rank_by_rate(stats.counts.cpu())
    shared, rest = ranked[:shared_width], ranked[shared_width:]
    seeds = rest[:num_routed]
    labels = balanced_assignment(hamming_to_seeds(stats, rest, seeds), expert_size)
    experts = torch.stack([rest[labels == j].sort().values for j in range(num_routed)])
    representatives = torch.tensor([nearest_to_centroid(stats, row) for row in experts], dtype=torch.long)
    return Partition(shared=shared.sort().values, experts=experts, representatives=representatives)
