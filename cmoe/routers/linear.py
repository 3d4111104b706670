"""A linear router fitted in closed form to predict how much output each expert carries."""

from torch import nn

from cmoe.modeling.modeling_cmoe import LinearRouter
from cmoe.numerics.grouping import Partition
from cmoe.numerics.router_fit import fit_linear_router
from cmoe.numerics.statistics import ActivationStats
from cmoe.routers.base import ROUTERS, RouterKind


def linear_router_weights(dense: nn.Module, partition: Partition, stats: ActivationStats, seed: int = 0) -> dict:
    """The ridge fit of each expert's summed output contribution on the FFN input (see fit_linear_router)."""
    if stats.input_gram is None or stats.input_target is None:
        raise ValueError("the linear router needs the input_gram and input_target statistics")
    weight, intercept = fit_linear_router(stats.input_gram.cpu(), stats.input_target.cpu(), partition.experts)
    dtype = dense.gate_proj.weight.dtype
    return {"proj.weight": weight.to(dtype), "proj.bias": intercept.to(dtype)}


ROUTERS.register(
    "linear",
    "fitted in closed form to predict each expert's output",
    RouterKind(LinearRouter, linear_router_weights, needs=("input_gram", "input_target")),
)
