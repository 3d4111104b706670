"""Block reconstruction: after a layer is grouped, routed and refitted, a few optimiser steps on its MoE
block so that its outputs match the dense FFN's on that layer's calibration inputs (the carved
upstream's), on the compute device, in float32, deterministic for a seed. The objective and the
router's straight-through estimator are in cmoe.numerics.reconstruction; this module moves tensors."""

from typing import Callable

import torch
from torch import nn

from cmoe.modeling.modeling_cmoe import CMoEBlock
from cmoe.numerics.reconstruction import relative_error, straight_through
from cmoe.registry import Registry

EVALUATION_ROWS = 4096


def _expert_parameters(block: CMoEBlock) -> list[nn.Parameter]:
    shared = list(block.shared.parameters()) if block.shared is not None else []
    return shared + [parameter for expert in block.experts for parameter in expert.parameters()]


def _router_parameters(block: CMoEBlock) -> list[nn.Parameter]:
    """The router's scoring weights; never its gate scale u, which standard formats cannot hold."""
    return [parameter for name, parameter in block.router.named_parameters() if name != "scale"]


RECONSTRUCTED_PARTS: Registry[Callable[[CMoEBlock], list[nn.Parameter]]] = Registry(
    "reconstructed part", "--reconstruct-parts"
)
RECONSTRUCTED_PARTS.register(
    "all", "experts' gate/up/down and the router", lambda block: _expert_parameters(block) + _router_parameters(block)
)
RECONSTRUCTED_PARTS.register("experts", "shared and routed experts' gate/up/down, routing fixed", _expert_parameters)
RECONSTRUCTED_PARTS.register("router", "the router alone (straight-through)", _router_parameters)


def block_output(block: CMoEBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's output on tokens `x` (T, d), with the router's straight-through gradient."""
    routing = block.router(x)
    out = block.shared(x) if block.shared is not None else torch.zeros_like(x)
    if not block.top_k:
        return out
    chosen = routing.probs.gather(-1, routing.indices)
    routing = routing._replace(weights=straight_through(routing.weights.float(), chosen))
    return out.index_add(0, *block._routed(x, routing))


@torch.no_grad()
def _outputs(block: nn.Module, rows: torch.Tensor, device: torch.device, chunk: int = EVALUATION_ROWS):
    return torch.cat([block(piece.to(device)).float().cpu() for piece in rows.split(chunk)])


def reconstruct_block(
    block: CMoEBlock,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    parts: str,
    steps: int,
    learning_rate: float,
    tokens_per_step: int,
    seed: int,
    device: torch.device,
    initial_outputs: torch.Tensor | None = None,
) -> tuple[float, float, torch.Tensor]:
    """Train `block` in place for `steps` Adam steps of `tokens_per_step` tokens drawn (seeded) from
    `inputs` (T, d), towards `targets` (T, d), tokens weighted by `weights` (T,). A block that ends no
    better on all the tokens is given back as it came, with its outputs as they came. Returns the
    relative error on every token before and after, and the block's outputs after (fp32, CPU).

    `initial_outputs` (T, d, fp32) are the block's outputs on `inputs` as it comes, when a stage already
    computed them (the refit does): one pass over every calibration token fewer, of the two the
    reconstruction's fixed cost is made of."""
    dtype = next(block.parameters()).dtype
    initial = {name: tensor.clone() for name, tensor in block.state_dict().items()}
    block.to(device, torch.float32)
    if initial_outputs is None:
        initial_outputs = _outputs(block, inputs, device)
    before = float(relative_error(initial_outputs, targets, weights))
    parameters = RECONSTRUCTED_PARTS.get(parts)(block)
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(len(inputs), (min(tokens_per_step, len(inputs)),), generator=generator)
            prediction = block_output(block, inputs[rows].to(device))
            loss = relative_error(prediction, targets[rows].to(device), weights[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    block.to(dtype)
    for parameter in block.parameters():
        parameter.grad = None
    outputs = _outputs(block, inputs, device)
    after = float(relative_error(outputs, targets, weights))
    if after >= before:
        block.load_state_dict(initial)
        return before, before, initial_outputs
    return before, after, outputs
