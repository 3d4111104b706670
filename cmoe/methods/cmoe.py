"""The CMoE method (the reference) and its measured options: which neurons are shared, how the rest
are grouped, which member represents each expert. Each option is a registry of its own."""

from dataclasses import dataclass
from typing import Callable

import torch

from cmoe.methods.base import METHODS, ConstructionMethod, LayerEvidence
from cmoe.numerics.assignment import balanced_assignment, balanced_kmeans
from cmoe.numerics.grouping import (
    Partition,
    cosine_similarities,
    hamming_to_seeds,
    most_active_member,
    nearest_to_centroid,
    rank_by_contribution,
    rank_by_rate,
)
from cmoe.numerics.statistics import ActivationStats
from cmoe.registry import Registry


@dataclass(frozen=True)
class Rule:
    """One choice of the CMoE method: the function, and the optional statistics it reads."""

    apply: Callable
    needs: tuple[str, ...] = ()


SHARED_BY: Registry[Rule] = Registry("shared-neuron ranking", "--shared-by")
GROUPINGS: Registry[Rule] = Registry("grouping", "--grouping")
REPRESENTATIVES: Registry[Rule] = Registry("representative", "--representative")

SHARED_BY.register(
    "rate", "most often marked neurons (reference)", Rule(lambda stats: rank_by_rate(stats.counts.cpu()))
)
SHARED_BY.register(
    "contribution", "largest mean |h_i| |W_down[:, i]|", Rule(rank_by_contribution, needs=("contribution_sum",))
)


def _hamming_grouping(
    stats: ActivationStats, rest: torch.Tensor, seeds: torch.Tensor, expert_size: int, iterations: int
):
    return balanced_assignment(hamming_to_seeds(stats, rest, seeds), expert_size)


def _kmeans_grouping(
    stats: ActivationStats, rest: torch.Tensor, seeds: torch.Tensor, expert_size: int, iterations: int
):
    cosine = cosine_similarities(stats.contribution_gram.cpu()[rest][:, rest])
    return balanced_kmeans(cosine, torch.arange(seeds.numel()), expert_size, iterations)


GROUPINGS.register(
    "hamming", "one balanced assignment on mark columns to the most active neurons (reference)", Rule(_hamming_grouping)
)
GROUPINGS.register(
    "kmeans", "balanced k-means on contribution co-activation", Rule(_kmeans_grouping, needs=("contribution_gram",))
)
REPRESENTATIVES.register("centroid", "member nearest its expert's centroid (reference)", Rule(nearest_to_centroid))
REPRESENTATIVES.register(
    "most-active", "member with the largest mean contribution", Rule(most_active_member, needs=("contribution_sum",))
)


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
    The other registered rules replace one step each.
    """
    d_h = stats.num_neurons
    expert_size = d_h // num_experts
    num_routed = num_experts - num_shared
    shared_width = num_shared * expert_size + d_h % num_experts
    ranked = SHARED_BY.get(shared_by).apply(stats)
    shared, rest = ranked[:shared_width], ranked[shared_width:]
    seeds = rest[:num_routed]
    labels = GROUPINGS.get(grouping).apply(stats, rest, seeds, expert_size, kmeans_iterations)
    experts = torch.stack([rest[labels == j].sort().values for j in range(num_routed)])
    pick = REPRESENTATIVES.get(representative).apply
    representatives = torch.tensor([pick(stats, row) for row in experts], dtype=torch.long)
    return Partition(shared=shared.sort().values, experts=experts, representatives=representatives)


def _build(evidence: LayerEvidence, options) -> Partition:
    return cmoe_partition(
        evidence.stats,
        num_experts=options.shape.experts,
        num_shared=options.shape.shared,
        shared_by=options.shared_by,
        grouping=options.grouping,
        kmeans_iterations=options.kmeans_iterations,
        representative=options.representative,
    )


def _statistics(options) -> tuple[str, ...]:
    rules = (
        SHARED_BY.get(options.shared_by),
        GROUPINGS.get(options.grouping),
        REPRESENTATIVES.get(options.representative),
    )
    return tuple(name for rule in rules for name in rule.needs)


METHODS.register(
    "cmoe",
    "the reference: shared experts, then balanced assignment",
    ConstructionMethod(_build, statistics=_statistics),
)
