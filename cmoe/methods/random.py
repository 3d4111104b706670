"""LLaMA-MoE's Independent-Random: a seeded equal random split of the neurons."""

from cmoe.methods.base import METHODS, ConstructionMethod, LayerEvidence
from cmoe.numerics.grouping import Partition, layer_seed, random_split, with_representatives
from cmoe.numerics.statistics import ActivationStats


def random_partition(stats: ActivationStats, num_experts: int, seed: int) -> Partition:
    """A seeded equal random split (leftover neurons of d_h mod N go to the shared block)."""
    leftovers, experts = random_split(stats.num_neurons, num_experts, seed)
    return with_representatives(stats, leftovers, experts)


def _build(evidence: LayerEvidence, options) -> Partition:
    return random_partition(evidence.stats, options.shape.routed, layer_seed(options.seed, evidence.layer))


METHODS.register("random", "LLaMA-MoE Independent-Random", ConstructionMethod(_build, shared_block=False))
