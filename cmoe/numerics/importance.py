"""Gradient importance of FFN neurons per data group, for LLaMA-MoE's Sharing methods (pure numerics).

Importance vectors are `v_g = sum |h * dL/dh|` over the tokens of each data group g (Zhu et al. 2024,
section 2 and appendix C); see cmoe.pipeline.gradients for the pass that measures them.
"""

import torch


def accumulate_importance(
    importance: torch.Tensor, hidden: torch.Tensor, grad: torch.Tensor, groups: torch.Tensor
) -> None:
    """In place: importance[g] += sum over the tokens t of group g of |h_t * dL/dh_t| (first-order
    Taylor estimate of the loss change when a neuron is removed). `hidden`, `grad`: (tokens, d_h)."""
    contribution = (hidden.float() * grad.float()).abs()
    importance.index_add_(0, groups.to(importance.device), contribution.to(importance.dtype))


def normalized_importance(importance: torch.Tensor) -> torch.Tensor:
    """Each group's vector divided by its sum, so large groups do not outweigh small ones."""
    importance = importance.double()
    return importance / importance.sum(dim=1, keepdim=True).clamp_min(1e-300)


def top_neurons(scores: torch.Tensor, count: int, exclude: torch.Tensor) -> torch.Tensor:
    """The `count` highest-scoring neurons not in `exclude`, sorted by index (ties: lower index first)."""
    scores = scores.double().clone()
    scores[exclude] = -torch.inf
    return torch.sort(-scores, stable=True).indices[:count].sort().values


def complement(neurons: torch.Tensor, num_neurons: int) -> torch.Tensor:
    """The sorted neuron indices not in `neurons`."""
    return torch.arange(num_neurons)[~torch.isin(torch.arange(num_neurons), neurons)]


def sharing_counts(importance: torch.Tensor, top: int) -> torch.Tensor:
    """(d_h,) in how many groups' top-`top` neurons (by importance) each neuron appears."""
    ranked = torch.sort(-importance.double(), dim=1, stable=True).indices[:, :top]
    return torch.bincount(ranked.reshape(-1), minlength=importance.shape[1])


def rank_by_sharing(importance: torch.Tensor, top: int) -> torch.Tensor:
    """Neurons from most to least shared across the groups' top sets; ties by total normalised importance."""
    counts = sharing_counts(importance, top).double()
    total = normalized_importance(importance).sum(0)
    key = counts * (total.max() + 1) + total
    return torch.sort(-key, stable=True).indices
