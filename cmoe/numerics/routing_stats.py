"""Load-balance figures and distances between routing distributions (pure numerics)."""

import math

import torch


def balance_figures(counts: torch.Tensor) -> dict[str, float] | None:
    """Load balance of one layer's per-expert token counts: coefficient of variation (std / mean,
    population std), max / mean, and entropy of the load distribution over log(experts) (1 = uniform).
    None when the layer routed nothing (0 active experts under an adaptive budget)."""
    counts = counts.double()
    mean = counts.mean()
    if mean <= 0:
        return None
    share = counts / counts.sum()
    nonzero = share[share > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    return {
        "cv": float(counts.std(unbiased=False) / mean),
        "max_over_mean": float(counts.max() / mean),
        "normalized_entropy": entropy / math.log(counts.numel()) if counts.numel() > 1 else 1.0,
    }


def routing_distributions(counts: torch.Tensor) -> torch.Tensor:
    """Counts (..., experts) normalised to fractions of the routed assignments along the last axis."""
    counts = counts.double()
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)


def distance_matrix(distributions: torch.Tensor) -> torch.Tensor:
    """(sources, sources) L2 distances between the rows of (sources, experts) distributions."""
    return torch.cdist(distributions.double().unsqueeze(0), distributions.double().unsqueeze(0))[0]


def load_fractions(counts: torch.Tensor) -> list[float]:
    """Share of routed assignments per expert."""
    total = counts.sum().item()
    return [round(count / total, 6) if total else 0.0 for count in counts.tolist()]
