"""Interchangeable pieces of carving: expert construction methods and router builders.

A construction method turns one layer's statistics into a Partition; a router builder turns the
dense weights and the Partition into the router's weights. Both are looked up by name.
"""

from typing import Callable

import torch

from cmoe.config import MoEShape
from cmoe.partition import Partition, cmoe_partition
from cmoe.statistics import ActivationStats

ConstructionMethod = Callable[[ActivationStats, MoEShape], Partition]
RouterBuilder = Callable[[torch.Tensor, torch.Tensor, Partition], dict[str, torch.Tensor]]


def _cmoe_method(stats: ActivationStats, shape: MoEShape) -> Partition:
    return cmoe_partition(stats, num_experts=shape.experts, num_shared=shape.shared)


def analytic_router_weights(gate_weight: torch.Tensor, up_weight: torch.Tensor, partition: Partition) -> dict:
    """Router rows = the L2-normalised gate and up rows of each expert's representative neuron."""
    reps = partition.representatives.to(gate_weight.device)
    gate = gate_weight[reps].float()
    up = up_weight[reps].float()
    return {
        "gate_proj.weight": (gate / gate.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(gate_weight.dtype),
        "up_proj.weight": (up / up.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(up_weight.dtype),
    }


METHODS: dict[str, ConstructionMethod] = {"cmoe": _cmoe_method}
ROUTER_BUILDERS: dict[str, RouterBuilder] = {"analytic": analytic_router_weights}
