"""Interchangeable pieces of carving: expert construction methods and router builders.

A construction method turns one layer's statistics into a Partition; a router builder turns the
dense weights, the Partition and the statistics into the router's weights. Both are looked up by name.
"""

from typing import Callable

import torch

from cmoe.options import CarveOptions
from cmoe.partition import Partition, cmoe_partition
from cmoe.statistics import ActivationStats

ConstructionMethod = Callable[[ActivationStats, CarveOptions], Partition]
RouterBuilder = Callable[[torch.nn.Module, Partition, ActivationStats], dict[str, torch.Tensor]]

ROUTER_RIDGE = 1e-3


def _cmoe_method(stats: ActivationStats, options: CarveOptions) -> Partition:
    return cmoe_partition(
        stats,
        num_experts=options.shape.experts,
        num_shared=options.shape.shared,
        shared_by=options.shared_by,
        grouping=options.grouping,
        kmeans_iterations=options.kmeans_iterations,
        representative=options.representative,
    )


def analytic_router_weights(dense: torch.nn.Module, partition: Partition, stats: ActivationStats) -> dict:
    """Router rows = the L2-normalised gate and up rows of each expert's representative neuron."""
    gate_weight, up_weight = dense.gate_proj.weight, dense.up_proj.weight
    reps = partition.representatives.to(gate_weight.device)
    gate = gate_weight[reps].float()
    up = up_weight[reps].float()
    return {
        "gate_proj.weight": (gate / gate.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(gate_weight.dtype),
        "up_proj.weight": (up / up.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(up_weight.dtype),
    }


def fit_linear_router(
    input_gram: torch.Tensor, input_target: torch.Tensor, experts: torch.Tensor, ridge: float = ROUTER_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of each expert's total output contribution on the FFN input (with intercept).

    `input_gram` = sum of [x, 1][x, 1]^T, `input_target` = sum of [x, 1] a^T with a the per-neuron
    contributions; an expert's target is the sum of its members' columns, so one solve serves all
    experts. The ridge is relative to the mean diagonal. Returns (weight (E, d), intercept (E,)).
    """
    gram = input_gram.double()
    target = input_target.double()[:, experts].sum(dim=-1)
    penalty = ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + penalty, target)
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def linear_router_weights(dense: torch.nn.Module, partition: Partition, stats: ActivationStats) -> dict:
    """A linear router predicting which experts carry the most output for a token (closed form)."""
    if stats.input_gram is None or stats.input_target is None:
        raise ValueError("the linear router needs the input_gram and input_target statistics")
    weight, intercept = fit_linear_router(stats.input_gram.cpu(), stats.input_target.cpu(), partition.experts)
    dtype = dense.gate_proj.weight.dtype
    return {"proj.weight": weight.to(dtype), "proj.bias": intercept.to(dtype)}


METHODS: dict[str, ConstructionMethod] = {"cmoe": _cmoe_method}
ROUTER_BUILDERS: dict[str, RouterBuilder] = {"analytic": analytic_router_weights, "linear": linear_router_weights}
