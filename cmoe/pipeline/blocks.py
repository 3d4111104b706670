"""Turning a dense gated MLP and a Partition into a CMoEBlock (tensor moving, no numerics)."""

import torch
from torch import nn

from cmoe.modeling.modeling_cmoe import CMoEBlock
from cmoe.numerics.grouping import Partition
from cmoe.numerics.refit import ArrowGram, DenseGram, Piece, accumulate_normal_equations
from cmoe.numerics.router_fit import best_selection, ridge_solve, selection_benefit
from cmoe.numerics.statistics import ActivationStats, with_constant
from cmoe.routers import ROUTERS
from cmoe.shape import MoELayerSpec


def _copy_swiglu(target: nn.Module, dense: nn.Module, neurons: torch.Tensor) -> None:
    neurons = neurons.to(dense.gate_proj.weight.device)
    target.gate_proj.weight.copy_(dense.gate_proj.weight[neurons])
    target.up_proj.weight.copy_(dense.up_proj.weight[neurons])
    target.down_proj.weight.copy_(dense.down_proj.weight[:, neurons])


@torch.no_grad()
def build_block(
    dense: nn.Module, partition: Partition, spec: MoELayerSpec, hidden_act: str, stats: ActivationStats, seed: int = 0
) -> CMoEBlock:
    """A CMoEBlock holding exactly the dense MLP's neurons, split as the partition says (`seed` for
    routers that start random), in eval mode: a noisy router must not add noise while carving."""
    weight = dense.gate_proj.weight
    with torch.device("meta"):
        block = CMoEBlock(weight.shape[1], hidden_act, spec)
    block = block.to_empty(device=weight.device).to(weight.dtype)
    if block.shared is not None:
        _copy_swiglu(block.shared, dense, partition.shared)
    for expert, neurons in zip(block.experts, partition.experts):
        _copy_swiglu(expert, dense, neurons)
    router_state = ROUTERS.get(spec.router).build(dense, partition, stats, seed)
    router_state["scale"] = torch.zeros(spec.num_experts)
    router_state["bias"] = torch.zeros(spec.num_experts)
    block.router.load_state_dict(router_state)
    return block.eval()


@torch.no_grad()
def scale_routed_outputs(block: CMoEBlock, factor: float) -> None:
    """Multiply every routed expert's output by `factor` (LLaMA-MoE's n/k), folded into its down_proj:
    exact, because the gate value multiplies the expert's output linearly."""
    for expert in block.experts:
        expert.down_proj.weight.mul_(factor)


def _hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float()


def down_projections(block: CMoEBlock) -> list[nn.Linear]:
    """The block's down projections in feature order: shared block first, then the routed experts."""
    shared = [block.shared.down_proj] if block.shared is not None else []
    return shared + [expert.down_proj for expert in block.experts]


@torch.no_grad()
def routed_pieces(block: CMoEBlock, x: torch.Tensor) -> list[Piece]:
    """What each down projection reads for tokens `x` (T, d) under the block's routing: the shared
    block's hidden state on every token, each expert's hidden state times its gate value on the
    tokens routed to it (no rows for an expert no token selects)."""
    pieces = []
    if block.shared is not None:
        pieces.append(Piece(_hidden(block.shared, x), torch.arange(x.shape[0], device=x.device)))
    routing = block.router(x) if block.top_k else None
    for index, expert in enumerate(block.experts):
        if routing is None:
            rows = torch.zeros(0, dtype=torch.long, device=x.device)
            pieces.append(Piece(x.new_zeros(0, expert.down_proj.weight.shape[1], dtype=torch.float32), rows))
            continue
        rows, slots = (routing.indices == index).nonzero(as_tuple=True)
        gates = routing.weights[rows, slots].float().unsqueeze(1)
        pieces.append(Piece(_hidden(expert, x[rows]) * gates, rows))
    return pieces


@torch.no_grad()
def refit_down_projections(
    block: CMoEBlock, inputs: list, outputs: list, ridge: float, scale: str = "mean", weights: list | None = None
) -> list[torch.Tensor]:
    """Replace every down projection of `block` by the least-squares fit (see cmoe.numerics.refit) of the dense
    outputs `outputs` from its inputs `inputs` (lists of batches, any leading shape), routing fixed; each
    token's squared error counts `weights` times (one flat (tokens,) tensor per batch; uniform if None).

    Returns the refitted block's outputs on `inputs` (fp32, CPU), computed from the hidden states the
    fit already needed, which are kept (tokens x active neurons) until then: no second pass.
    """
    downs = down_projections(block)
    weight = downs[0].weight
    sizes = [down.weight.shape[1] for down in downs]
    offsets = [sum(sizes[:index]) for index in range(len(sizes))]
    hidden_size = weight.shape[0]
    # Under top-1 routing no two experts share a token: only the shared block couples them (arrow system).
    if block.top_k <= 1:
        gram = ArrowGram(sizes, weight.device, shared=block.shared is not None)
    else:
        gram = DenseGram(sizes, weight.device)
    cross = torch.zeros(sum(sizes), hidden_size, dtype=torch.float64, device=weight.device)
    kept = []
    for x, y, batch_weights in zip(inputs, outputs, weights or [None] * len(inputs), strict=True):
        x = x.reshape(-1, hidden_size).to(weight.device, weight.dtype)
        pieces = routed_pieces(block, x)
        y = y.reshape(-1, hidden_size).to(weight.device, torch.float32)
        if batch_weights is None:
            accumulate_normal_equations(gram, cross, pieces, offsets, y)
        else:
            root = batch_weights.to(weight.device, torch.float32).sqrt()
            weighted = [Piece(piece.features * root[piece.rows, None], piece.rows) for piece in pieces]
            accumulate_normal_equations(gram, cross, weighted, offsets, y * root[:, None])
        kept.append([Piece(piece.features.cpu(), piece.rows.cpu()) for piece in pieces])
    initial = torch.cat([down.weight for down in downs], dim=1)
    fitted = gram.solve(cross, initial, ridge, scale)
    gram = None  # the factorised system goes before the outputs are computed
    for down, part in zip(downs, fitted.split(sizes, dim=1)):
        down.weight.copy_(part.to(weight.dtype))
    transposed = [down.weight.float().cpu().T for down in downs]
    refitted = []
    for x, pieces in zip(inputs, kept):
        out = torch.zeros(x.shape[:-1].numel(), hidden_size)
        for piece, weight_t in zip(pieces, transposed):
            out.index_add_(0, piece.rows, piece.features @ weight_t)
        refitted.append(out.view(x.shape))
    return refitted


def router_projection(block: CMoEBlock) -> nn.Linear:
    """The linear map that scores tokens in a linear router (`proj`, with intercept) or gate (`gate`)."""
    router = block.router
    projection = getattr(router, "proj", None) or getattr(router, "gate", None)
    if not isinstance(projection, nn.Linear):
        raise ValueError(f"{type(router).__name__} has no linear scoring map to refit")
    return projection


@torch.no_grad()
def refit_router_scores(block: CMoEBlock, inputs: list, targets: list, gate_value: float, logit_factor: float) -> None:
    """Fit the block's linear router, by ridge regression on its input, to pick on each token the experts
    that remove the most of what the shared block leaves of the target (see best_selection), under the
    block's current experts. `gate_value` is the weight a selected expert's output carries (1 under the
    cmoe rule, about 1/k with a flattened renormalising gate); the fitted scores are multiplied by
    `logit_factor` (FlattenGate's). Inputs and targets are lists of batches of any leading shape."""
    projection = router_projection(block)
    weight = projection.weight
    hidden_size = weight.shape[1]
    intercept = projection.bias is not None
    width = hidden_size + int(intercept)
    gram = torch.zeros(width, width, dtype=torch.float64, device=weight.device)
    cross = torch.zeros(width, len(block.experts), dtype=torch.float64, device=weight.device)
    for x, y in zip(inputs, targets):
        x = x.reshape(-1, hidden_size).to(weight.device, weight.dtype)
        missing = y.reshape(-1, hidden_size).to(weight.device, torch.float32)
        if block.shared is not None:
            missing = missing - block.shared(x).float()
        benefit = torch.stack([selection_benefit(missing, expert(x).float() * gate_value) for expert in block.experts])
        design = (with_constant(x.float()) if intercept else x.float()).double()
        gram += design.T @ design
        cross += design.T @ best_selection(benefit.T, block.top_k)
    solution = ridge_solve(gram, cross) * logit_factor
    weight.copy_(solution[:hidden_size].T.to(weight.dtype))
    if intercept:
        projection.bias.copy_(solution[hidden_size].to(weight.dtype))
