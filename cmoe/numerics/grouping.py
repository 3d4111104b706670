"""Partitions of a layer's FFN neurons into a shared block and routed experts, and the rankings and
distances the construction methods build them from (pure numerics)."""

from dataclasses import dataclass

import torch

from cmoe.numerics.statistics import ActivationStats


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


def layer_seed(seed: int, layer: int) -> int:
    """One reproducible seed per (run seed, layer), so layers are split independently."""
    return seed * 1_000_003 + layer


def rank_by_rate(counts: torch.Tensor) -> torch.Tensor:
    """Neuron indices from most to least often marked; ties keep the lower index first."""
    return torch.sort(-counts.long(), stable=True).indices


def rank_by_contribution(stats: ActivationStats) -> torch.Tensor:
    """Neuron indices from largest to smallest mean output contribution; ties keep the lower index first."""
    return torch.sort(-stats.mean_contribution.cpu(), stable=True).indices


def hamming_to_seeds(stats: ActivationStats, neurons: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """(n, N_r) L1 distances between binary mark columns: |c_i - c_s|_1 = cnt_i + cnt_s - 2 C_is."""
    counts = stats.counts.double().cpu()
    coact = stats.coactivation.cpu()[:, seeds][neurons].double()  # columns first: no n x d_h copy
    return counts[neurons].unsqueeze(1) + counts[seeds].unsqueeze(0) - 2.0 * coact


def cosine_similarities(gram: torch.Tensor) -> torch.Tensor:
    """Cosines between the contribution columns of the neurons, from their Gram matrix."""
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / norms.unsqueeze(0) / norms.unsqueeze(1)


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


def most_active_member(stats: ActivationStats, members: torch.Tensor) -> int:
    """The member with the largest mean output contribution (or mark count when that was not collected)."""
    score = stats.mean_contribution.cpu() if stats.contribution_sum is not None else stats.counts.double().cpu()
    members = members.sort().values
    return int(members[int(torch.argmax(score[members]))])


def with_representatives(stats: ActivationStats, shared: torch.Tensor, experts: torch.Tensor) -> Partition:
    """A Partition whose representatives are each expert's member nearest its centroid."""
    representatives = torch.tensor([nearest_to_centroid(stats, row) for row in experts], dtype=torch.long)
    return Partition(shared=shared.sort().values, experts=experts, representatives=representatives)


def random_split(num_neurons: int, num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(leftovers, experts (N, m)): a seeded random equal partition; the d_h mod N leftovers are set apart."""
    permutation = torch.randperm(num_neurons, generator=torch.Generator().manual_seed(seed))
    leftover = num_neurons % num_experts
    experts = permutation[leftover:].view(num_experts, -1).sort(dim=1).values
    return permutation[:leftover].sort().values, experts


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
