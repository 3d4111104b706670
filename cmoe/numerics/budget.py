"""Per-layer budgets of active experts at an equal total (pure numerics).

Layers are not equally hurt by dropping neurons (SmolLM2's first FFN carries most of what its
embeddings lack), so the `adaptive` budget moves active experts to the layers where they remove the
most output error, keeping the total number of active experts (hence FFN FLOPs) of the uniform budget.
"""

import torch


def selection_errors(
    target: torch.Tensor,
    shared: torch.Tensor,
    expert_outputs: torch.Tensor,
    preference: torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed squared error between the dense FFN output and the carved one with k = 0..R experts.

    `target`, `shared` (T, d): dense output and shared-block output; `expert_outputs` (T, R, d): every
    routed expert's output; `preference` (T, R): router scores whose top-k is the selection;
    `token_weights` (T,): each token's weight in the sum (default 1). Returns (R+1,).
    Expanded through per-token Gram matrices (T, R, R), in float64, so no (T, R, d) partial sums are formed:
    |r - sum_{j<=k} o_j|^2 = |r|^2 - 2 sum_{j<=k} r.o_j + sum_{i,j<=k} o_i.o_j with r = target - shared.
    """
    residual = (target - shared).double()
    outputs = expert_outputs.double()
    order = preference.argsort(dim=1, descending=True, stable=True)
    cross = torch.bmm(outputs, residual.unsqueeze(-1)).squeeze(-1).gather(1, order)
    gram = torch.bmm(outputs, outputs.transpose(1, 2))
    gram = gram.gather(1, order.unsqueeze(-1).expand_as(gram)).gather(2, order.unsqueeze(1).expand_as(gram))
    within = gram.cumsum(dim=1).cumsum(dim=2).diagonal(dim1=1, dim2=2)
    weights = torch.ones(len(residual), dtype=torch.float64) if token_weights is None else token_weights.double()
    weights = weights.to(residual.device)
    removed = ((within - 2.0 * cross.cumsum(dim=1)) * weights.unsqueeze(1)).sum(dim=0)
    base = (residual.square().sum(dim=1) * weights).sum()
    return torch.cat([base.unsqueeze(0), base + removed]).to(target.dtype)


def allocate_active_experts(errors: torch.Tensor, total: int) -> list[int]:
    """Active experts per layer minimising the summed error with exactly `total` active experts.

    `errors` (L, R+1): layer l's error with k = 0..R experts. Exact dynamic programme over layers
    (O(L * total * R)); ties go to the more uniform split seen first (lower k for earlier layers).
    """
    layers, options = errors.shape
    if not 0 <= total <= layers * (options - 1):
        raise ValueError(f"cannot place {total} active experts in {layers} layers of {options - 1} experts")
    cost = errors.double().tolist()
    infinity = float("inf")
    best = [0.0] + [infinity] * total
    choices: list[list[int]] = []
    for layer_cost in cost:
        updated = [infinity] * (total + 1)
        chosen = [0] * (total + 1)
        for used in range(total + 1):
            for k in range(min(options - 1, used) + 1):
                candidate = best[used - k] + layer_cost[k]
                if candidate < updated[used]:
                    updated[used], chosen[used] = candidate, k
        best = updated
        choices.append(chosen)
    allocation = []
    remaining = total
    for chosen in reversed(choices):
        allocation.append(chosen[remaining])
        remaining -= chosen[remaining]
    return allocation[::-1]
