"""Losses measured during fine-tuning: whole-model mean NLL on fixed windows, with the shared NLL."""

import math
from contextlib import nullcontext

import torch
from torch import nn

from cmoe.numerics.nll import summed_next_token_nll


@torch.no_grad()
def windows_nll(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, autocast=nullcontext
) -> float:
    """Mean next-token NLL of a whole-model forward in eval mode (no dropout, no RNG), as training
    evaluates it: a reloaded model gives the same number bit for bit when it holds the same weights."""
    was_training = model.training
    model.eval()
    total, predicted = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        with autocast():
            logits = model(input_ids=batch, use_cache=False).logits
        batch_total, batch_predicted = summed_next_token_nll(logits, batch)
        total += batch_total
        predicted += batch_predicted
    model.train(was_training)
    return total / predicted


def evaluation_point(model: nn.Module, windows: torch.Tensor, batch_size: int, accelerator, step: int) -> dict:
    """One point of the evaluation curve: mean NLL and perplexity on the eval windows at `step`."""
    nll = windows_nll(model, windows, batch_size, accelerator.device, accelerator.autocast)
    return {"step": step, "mean_nll": nll, "perplexity": math.exp(nll)}
