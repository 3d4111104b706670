"""LLaMA-MoE's Independent-Clustering: balanced k-means on the rows of W_up."""

import torch

from cmoe.methods.base import METHODS, ConstructionMethod, LayerEvidence
from cmoe.numerics.assignment import balanced_kmeans_points
from cmoe.numerics.grouping import Partition, layer_seed, rank_by_rate, with_representatives
from cmoe.numerics.statistics import ActivationStats


def clustering_partition(
    stats: ActivationStats, up_weight: torch.Tensor, num_experts: int, iterations: int, seed: int
) -> Partition:
    """Balanced k-means on the rows of W_up; the d_h mod N most often marked neurons form the
    (leftover) shared block."""
    leftover = stats.num_neurons % num_experts
    ranked = rank_by_rate(stats.counts.cpu())
    shared, rest = ranked[:leftover], ranked[leftover:].sort().values
    labels = balanced_kmeans_points(up_weight.detach().cpu()[rest], num_experts, iterations, seed)
    experts = torch.stack([rest[labels == j] for j in range(num_experts)])
    return with_representatives(stats, shared, experts)


def _build(evidence: LayerEvidence, options) -> Partition:
    seed = layer_seed(options.seed, evidence.layer)
    up_weight = evidence.dense.up_proj.weight
    return clustering_partition(evidence.stats, up_weight, options.shape.routed, options.kmeans_iterations, seed)


METHODS.register(
    "clustering",
    "LLaMA-MoE Independent-Clustering (balanced k-means on W_up rows)",
    ConstructionMethod(_build, shared_block=False),
)
