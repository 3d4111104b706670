"""A linear gate without intercept, fitted in closed form: the router standard MoE formats hold."""

from torch import nn

from cmoe.modeling.modeling_cmoe import LinearGateRouter
from cmoe.numerics.grouping import Partition
from cmoe.numerics.router_fit import fit_linear_gate
from cmoe.numerics.statistics import ActivationStats
from cmoe.routers.base import ROUTERS, RouterKind


def linear_gate_weights(dense: nn.Module, partition: Partition, stats: ActivationStats, seed: int = 0) -> dict:
    """The ridge fit, without intercept, of each expert's summed output contribution on the FFN input."""
    if stats.input_gram is None or stats.input_target is None:
        raise ValueError("the linear gate needs the input_gram and input_target statistics")
    weight = fit_linear_gate(stats.input_gram.cpu(), stats.input_target.cpu(), partition.experts)
    return {"gate.weight": weight.to(dense.gate_proj.weight.dtype)}


ROUTERS.register(
    "linear-gate",
    "like linear, without intercept: the gate of Qwen2-MoE, Mixtral, GLM4-MoE (exportable)",
    RouterKind(LinearGateRouter, linear_gate_weights, needs=("input_gram", "input_target")),
)
