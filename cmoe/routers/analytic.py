"""CMoE's training-free router: each expert's representative neuron scores the token."""

from torch import nn

from cmoe.modeling.modeling_cmoe import AnalyticRouter
from cmoe.numerics.grouping import Partition
from cmoe.numerics.statistics import ActivationStats
from cmoe.routers.base import ROUTERS, RouterKind


def analytic_router_weights(dense: nn.Module, partition: Partition, stats: ActivationStats, seed: int = 0) -> dict:
    """Router rows = the L2-normalised gate and up rows of each expert's representative neuron."""
    gate_weight, up_weight = dense.gate_proj.weight, dense.up_proj.weight
    reps = partition.representatives.to(gate_weight.device)
    gate = gate_weight[reps].float()
    up = up_weight[reps].float()
    return {
        "gate_proj.weight": (gate / gate.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(gate_weight.dtype),
        "up_proj.weight": (up / up.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(up_weight.dtype),
    }


ROUTERS.register(
    "analytic",
    "the reference: each expert's representative neuron scores the token",
    RouterKind(AnalyticRouter, analytic_router_weights),
)
