"""Next-token negative log-likelihood: the one loss every evaluation and training report uses."""

import torch
import torch.nn.functional as F


def summed_next_token_nll(logits: torch.Tensor, ids: torch.Tensor, softcap: float | None = None) -> tuple[float, int]:
    """(summed NLL in fp32, tokens predicted) of windows `ids` (B, T) under `logits` (B, T, V): each
    position predicts the next token, so T - 1 predictions per window. `softcap` applies Gemma-style
    final-logit soft-capping first."""
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    targets = ids[:, 1:].to(logits.device)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return total.item(), targets.numel()
