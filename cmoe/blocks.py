"""Turning a dense gated MLP and a Partition into a CMoEBlock (tensor moving, no numerics)."""

import torch
from torch import nn

from cmoe.construction import ROUTER_BUILDERS
from cmoe.modeling_cmoe import CMoEBlock
from cmoe.partition import Partition
from cmoe.statistics import ActivationStats

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


def is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in GATED_MLP_PARTS)


def _copy_swiglu(target: nn.Module, dense: nn.Module, neurons: torch.Tensor) -> None:
    neurons = neurons.to(dense.gate_proj.weight.device)
    target.gate_proj.weight.copy_(dense.gate_proj.weight[neurons])
    target.up_proj.weight.copy_(dense.up_proj.weight[neurons])
    target.down_proj.weight.copy_(dense.down_proj.weight[:, neurons])


@torch.no_grad()
def build_block(
    dense: nn.Module, partition: Partition, spec: dict, hidden_act: str, stats: ActivationStats, seed: int = 0
) -> CMoEBlock:
    """A CMoEBlock holding exactly the dense MLP's neurons, split as the partition says (`seed` for
    routers that start random)."""
    weight = dense.gate_proj.weight
    with torch.device("meta"):
        block = CMoEBlock(weight.shape[1], hidden_act, spec)
    block = block.to_empty(device=weight.device).to(weight.dtype)
    if block.shared is not None:
        _copy_swiglu(block.shared, dense, partition.shared)
    for expert, neurons in zip(block.experts, partition.experts):
        _copy_swiglu(expert, dense, neurons)
    router_state = ROUTER_BUILDERS[spec["router"]](dense, partition, stats, seed)
    router_state["scale"] = torch.zeros(spec["num_experts"])
    router_state["bias"] = torch.zeros(spec["num_experts"])
    block.router.load_state_dict(router_state)
    return block


@torch.no_grad()
def scale_routed_outputs(block: CMoEBlock, factor: float) -> None:
    """Multiply every routed expert's output by `factor` (LLaMA-MoE's n/k), folded into its down_proj:
    exact, because the gate value multiplies the expert's output linearly."""
    for expert in block.experts:
        expert.down_proj.weight.mul_(factor)
