"""Interchangeable pieces of carving: expert construction methods and router builders.

A construction method turns one layer's evidence (statistics, weights, gradient importance) into a
Partition; a router builder turns the dense weights, the Partition and the statistics into the router's weights. Both are looked up by name.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from cmoe.errors import CmoeError
from cmoe.methods import (
    clustering_partition,
    layer_seed,
    random_partition,
    sharing_inner_partition,
    sharing_inter_partition,
)
from cmoe.options import CarveOptions
from cmoe.partition import Partition, cmoe_partition
from cmoe.statistics import ActivationStats


@dataclass(frozen=True)
class LayerEvidence:
    """What a construction method may read about one layer: its mark statistics, the dense MLP, the
    gradient importance (groups, d_h) when the method asked for it, and the layer's index (for seeds)."""

    stats: ActivationStats
    dense: torch.nn.Module | None = None
    importance: torch.Tensor | None = None
    layer: int = 0


@dataclass(frozen=True)
class ConstructionMethod:
    """A named way to split a layer's neurons into a Partition, with what it needs and allows:
    `needs_gradients` (the gradient pass, see cmoe.gradients), `overlapping` experts, `shared_block`
    (whether S > 0 means something for it)."""

    build: Callable[[LayerEvidence, CarveOptions], Partition]
    needs_gradients: bool = False
    overlapping: bool = False
    shared_block: bool = True

    def __call__(self, stats: ActivationStats, options: CarveOptions, **evidence) -> Partition:
        return self.build(LayerEvidence(stats, **evidence), options)

    def check(self, name: str, options: CarveOptions) -> None:
        if options.shape.shared and not self.shared_block:
            raise CmoeError(
                f"--method {name} builds no shared expert: use S0 (e.g. --config S0A{options.shape.active}E{options.shape.experts})"
            )


RouterBuilder = Callable[[torch.nn.Module, Partition, ActivationStats, int], dict[str, torch.Tensor]]

ROUTER_RIDGE = 1e-3


def _cmoe_method(evidence: LayerEvidence, options: CarveOptions) -> Partition:
    return cmoe_partition(
        evidence.stats,
        num_experts=options.shape.experts,
        num_shared=options.shape.shared,
        shared_by=options.shared_by,
        grouping=options.grouping,
        kmeans_iterations=options.kmeans_iterations,
        representative=options.representative,
    )


def _random_method(evidence: LayerEvidence, options: CarveOptions) -> Partition:
    return random_partition(evidence.stats, options.shape.routed, layer_seed(options.seed, evidence.layer))


def _clustering_method(evidence: LayerEvidence, options: CarveOptions) -> Partition:
    seed = layer_seed(options.seed, evidence.layer)
    up_weight = evidence.dense.up_proj.weight
    return clustering_partition(evidence.stats, up_weight, options.shape.routed, options.kmeans_iterations, seed)


def _sharing_inner_method(evidence: LayerEvidence, options: CarveOptions) -> Partition:
    return sharing_inner_partition(evidence.stats, evidence.importance, evidence.stats.num_neurons // options.shape.experts)


def _sharing_inter_method(evidence: LayerEvidence, options: CarveOptions) -> Partition:
    spec = options.shape.layer_spec(evidence.stats.num_neurons, options.router)
    return sharing_inter_partition(evidence.stats, evidence.importance, spec["expert_size"], spec["shared_size"])


def analytic_router_weights(dense: torch.nn.Module, partition: Partition, stats: ActivationStats, seed: int = 0) -> dict:
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


def linear_router_weights(dense: torch.nn.Module, partition: Partition, stats: ActivationStats, seed: int = 0) -> dict:
    """A linear router predicting which experts carry the most output for a token (closed form)."""
    if stats.input_gram is None or stats.input_target is None:
        raise ValueError("the linear router needs the input_gram and input_target statistics")
    weight, intercept = fit_linear_router(stats.input_gram.cpu(), stats.input_target.cpu(), partition.experts)
    dtype = dense.gate_proj.weight.dtype
    return {"proj.weight": weight.to(dtype), "proj.bias": intercept.to(dtype)}


def noisy_topk_router_weights(dense: torch.nn.Module, partition: Partition, stats: ActivationStats, seed: int = 0) -> dict:
    """A random gate W_g (from `seed`, std 1/sqrt(d)) and a zero noise map W_noise, as Shazeer et al.
    (2017) start theirs: meant to be trained by `cmoe finetune`, not used training-free."""
    hidden_size = dense.gate_proj.weight.shape[1]
    generator = torch.Generator().manual_seed(seed)
    gate = torch.randn(partition.experts.shape[0], hidden_size, generator=generator) / hidden_size**0.5
    dtype = dense.gate_proj.weight.dtype
    return {"gate.weight": gate.to(dtype), "noise.weight": torch.zeros_like(gate, dtype=dtype)}


METHODS: dict[str, ConstructionMethod] = {
    "cmoe": ConstructionMethod(_cmoe_method),
    "random": ConstructionMethod(_random_method, shared_block=False),
    "clustering": ConstructionMethod(_clustering_method, shared_block=False),
    "sharing-inner": ConstructionMethod(_sharing_inner_method, needs_gradients=True, overlapping=True, shared_block=False),
    "sharing-inter": ConstructionMethod(_sharing_inter_method, needs_gradients=True),
}
ROUTER_BUILDERS: dict[str, RouterBuilder] = {
    "analytic": analytic_router_weights,
    "linear": linear_router_weights,
    "noisy-topk": noisy_topk_router_weights,
}
