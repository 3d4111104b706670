"""The closed-form fit of the linear router (pure numerics)."""

import torch

ROUTER_RIDGE = 1e-3


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


def fit_linear_gate(
    input_gram: torch.Tensor, input_target: torch.Tensor, experts: torch.Tensor, ridge: float = ROUTER_RIDGE
) -> torch.Tensor:
    """The same ridge regression without intercept (the gate standard MoE formats hold): the constant
    column of the statistics is dropped. Returns the weight (E, d)."""
    gram = input_gram.double()[:-1, :-1]
    target = input_target.double()[:-1][:, experts].sum(dim=-1)
    penalty = ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + penalty, target).T.contiguous()
