"""LLaMA-MoE's Sharing-Inter: neurons important to most groups are shared, the rest split by importance."""

import torch

from cmoe.methods.base import METHODS, ConstructionMethod, LayerEvidence
from cmoe.numerics.assignment import balanced_assignment
from cmoe.numerics.grouping import Partition, with_representatives
from cmoe.numerics.importance import complement, normalized_importance, rank_by_sharing
from cmoe.numerics.statistics import ActivationStats


def sharing_inter_partition(
    stats: ActivationStats, importance: torch.Tensor, expert_size: int, shared_width: int
) -> Partition:
    """The `shared_width` neurons found in most groups' top sets form the shared (residual) block; the
    rest are split into equal disjoint experts by one balanced assignment that maximises each neuron's
    normalised importance for its expert's group."""
    shared = rank_by_sharing(importance, expert_size)[:shared_width]
    rest = complement(shared, stats.num_neurons)
    cost = -normalized_importance(importance)[:, rest].T
    labels = balanced_assignment(cost, expert_size)
    experts = torch.stack([rest[labels == j] for j in range(importance.shape[0])])
    return with_representatives(stats, shared, experts)


def _build(evidence: LayerEvidence, options) -> Partition:
    spec = options.layer_spec(evidence.stats.num_neurons)
    return sharing_inter_partition(evidence.stats, evidence.importance, spec.expert_size, spec.shared_size)


METHODS.register(
    "sharing-inter",
    "LLaMA-MoE Sharing-Inter (gradient importance per data group, with shared experts)",
    ConstructionMethod(_build, needs_gradients=True),
)
