"""LLaMA-MoE's Sharing-Inner: each expert = the neurons most important to one data group (experts overlap)."""

import torch

from cmoe.methods.base import METHODS, ConstructionMethod, LayerEvidence
from cmoe.numerics.grouping import Partition, with_representatives
from cmoe.numerics.importance import normalized_importance, top_neurons
from cmoe.numerics.statistics import ActivationStats


def sharing_inner_partition(stats: ActivationStats, importance: torch.Tensor, expert_size: int) -> Partition:
    """Expert g = the `expert_size` most important neurons for data group g (experts may overlap;
    neurons important to no group are left out). The d_h mod N neurons of largest total normalised
    importance form the (leftover) shared block."""
    leftover = stats.num_neurons - importance.shape[0] * expert_size
    shared = torch.sort(-normalized_importance(importance).sum(0), stable=True).indices[:leftover]
    experts = torch.stack([top_neurons(row, expert_size, shared) for row in importance])
    return with_representatives(stats, shared, experts)


def _build(evidence: LayerEvidence, options) -> Partition:
    return sharing_inner_partition(
        evidence.stats, evidence.importance, evidence.stats.num_neurons // options.shape.experts
    )


METHODS.register(
    "sharing-inner",
    "LLaMA-MoE Sharing-Inner (gradient importance per data group, overlapping experts)",
    ConstructionMethod(_build, needs_gradients=True, overlapping=True, shared_block=False),
)
