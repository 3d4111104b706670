"""Shazeer et al. (2017)'s noisy top-k gate, from a random start: meant to be trained by `cmoe finetune`."""

import torch
from torch import nn

from cmoe.modeling.modeling_cmoe import NoisyTopKRouter
from cmoe.numerics.grouping import Partition
from cmoe.numerics.statistics import ActivationStats
from cmoe.routers.base import ROUTERS, RouterKind


def noisy_topk_router_weights(dense: nn.Module, partition: Partition, stats: ActivationStats, seed: int = 0) -> dict:
    """A random gate W_g (from `seed`, std 1/sqrt(d)) and a zero noise map W_noise, as Shazeer et al. start theirs."""
    hidden_size = dense.gate_proj.weight.shape[1]
    generator = torch.Generator().manual_seed(seed)
    gate = torch.randn(partition.experts.shape[0], hidden_size, generator=generator) / hidden_size**0.5
    dtype = dense.gate_proj.weight.dtype
    return {"gate.weight": gate.to(dtype), "noise.weight": torch.zeros_like(gate, dtype=dtype)}


ROUTERS.register(
    "noisy-topk",
    "Shazeer 2017, random start: for `cmoe finetune`",
    RouterKind(NoisyTopKRouter, noisy_topk_router_weights, training_free=False, follows_gating=False),
)
