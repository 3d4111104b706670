"""Block reconstruction's objective (pure numerics): how far a carved block's outputs are from the dense
FFN's on one layer's calibration tokens, each token weighted as a `TOKEN_WEIGHTINGS` rule says.

The error is relative, sum_t w_t |y_t - f(x_t)|^2 / sum_t w_t |y_t|^2, so that layers of any scale
train at one learning rate and report comparable figures. Routing is discrete; the router learns
through a straight-through estimator: the forward pass keeps the hard top-k and its gate values, the
backward pass lets each selected expert's gate pass the gradient of its router probability.
"""

from typing import Callable

import torch

from cmoe.registry import Registry

TOKEN_WEIGHTINGS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry(
    "token weighting", "--reconstruct-weighting"
)
TOKEN_WEIGHTINGS.register("uniform", "every calibration token counts the same", lambda energy: torch.ones_like(energy))
TOKEN_WEIGHTINGS.register(
    "residual",
    "each token by 1 / its residual stream's energy: the error the next layer's RMSNorm sees",
    lambda energy: 1.0 / energy.clamp_min(1e-12),
)


def token_weights(rule: str, residual_energy: torch.Tensor) -> torch.Tensor:
    """(T,) weights of the tokens under `rule`, from their residual energies |h_t|^2, scaled to mean 1."""
    weights = TOKEN_WEIGHTINGS.get(rule)(residual_energy.double())
    return (weights / weights.mean()).float()


def relative_error(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t |y_t - p_t|^2 / sum_t w_t |y_t|^2 over rows t of (T, d) `prediction` and `target`."""
    residual = (target.float() - prediction.float()).square().sum(dim=-1)
    return (weights * residual).sum() / (weights * target.float().square().sum(dim=-1)).sum().clamp_min(1e-30)


def straight_through(gate_values: torch.Tensor, chosen_probabilities: torch.Tensor) -> torch.Tensor:
    """The gate values forward (exactly: the added term is exactly zero); their sum with the selected
    experts' router probabilities backward."""
    return gate_values + (chosen_probabilities - chosen_probabilities.detach())
