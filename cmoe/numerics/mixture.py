"""Training data mixtures: which domain and which window each training sample comes from.

Static mixtures sample domains with fixed weights (LLaMA-MoE's Static strategies); dynamic mixtures
re-weight the domains every few steps by how far the model's loss on each domain lies above the dense
model's (Sheared-LLaMA's dynamic batch loading, LLaMA-MoE's Dynamic strategies). Every draw is a pure
function of (seed, sample index, weights), so a resumed run draws exactly what an uninterrupted one does.
"""

import math
import random

from cmoe.errors import CmoeError

DYNAMIC_SMOOTHING = 1e-4


def normalized_weights(weights: list[float]) -> list[float]:
    """Weights scaled to sum to 1; negative weights or a non-positive sum are user errors."""
    if not weights:
        raise CmoeError("no training data: pass at least one --data SOURCE")
    negative = [weight for weight in weights if weight < 0]
    if negative:
        raise CmoeError(f"--data weights must not be negative (got {negative[0]:g})")
    total = sum(weights)
    if total <= 0:
        raise CmoeError(f"--data weights must sum to a positive number (they sum to {total:g})")
    return [weight / total for weight in weights]


def draw_sample(seed: int, index: int, weights: list[float], domain_lengths: list[int], seqlen: int) -> tuple[int, int]:
    """(domain, window start) of training sample `index`: the domain by `weights`, the start uniform
    over that domain's training tokens. A private RNG seeded from (seed, index) keeps it reproducible
    and independent of every other random state."""
    rng = random.Random(f"cmoe-mixture:{seed}:{index}")
    domain = rng.choices(range(len(weights)), weights=weights)[0]
    start = rng.randint(0, domain_lengths[domain] - seqlen)
    return domain, start


def dynamic_weights(
    weights: list[float],
    losses: list[float],
    reference_losses: list[float],
    step_size: float = 1.0,
    smoothing: float = DYNAMIC_SMOOTHING,
) -> list[float]:
    """Sheared-LLaMA's update: `w <- softmax(log w + step_size * max(loss - reference, 0))`, mixed with
    a little of the uniform distribution so that no domain's weight reaches zero."""
    gaps = [max(loss - reference, 0.0) for loss, reference in zip(losses, reference_losses)]
    logits = [math.log(max(weight, 1e-12)) + step_size * gap for weight, gap in zip(weights, gaps)]
    peak = max(logits)
    exponentials = [math.exp(logit - peak) for logit in logits]
    total = sum(exponentials)
    uniform = 1.0 / len(weights)
    return [(1 - smoothing) * value / total + smoothing * uniform for value in exponentials]
