"""Neuron activation statistics, accumulated one batch of tokens at a time.

Nothing here keeps the tokens x d_h activation matrix: each batch's top-K_a marks are folded into
per-neuron counts and a d_h x d_h co-activation count matrix, which is all the grouping needs
(Hamming distances between binary mark columns follow from them).
"""

from dataclasses import dataclass

import torch


def normalized_swiglu_state(
    x: torch.Tensor,
    gate_out: torch.Tensor,
    up_out: torch.Tensor,
    gate_row_norms: torch.Tensor,
    up_row_norms: torch.Tensor,
    act,
) -> torch.Tensor:
    """`act(w^_gate . x^) * (w^_up . x^)` from the dense pre-activations, without a second matmul.

    The reference profiles on unit-norm tokens and unit-norm weight rows; since
    `w^ . x^ = (w . x) / (|w| |x|)` the dense layer's own gate/up outputs give the same state.
    """
    token_norms = x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gate = gate_out.float() / token_norms / gate_row_norms.float().clamp_min(1e-12)
    up = up_out.float() / token_norms / up_row_norms.float().clamp_min(1e-12)
    return act(gate) * up


def top_k_marks(state: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (tokens, k) of the k neurons with the largest |state| per token: the ones of the binary marks."""
    return state.abs().topk(k, dim=-1).indices


def coactivation_counts(marks: torch.Tensor, num_neurons: int) -> torch.Tensor:
    """(d_h, d_h) int64 counts of tokens in which neurons i and j are both marked (diagonal: marks of i)."""
    marks = marks.reshape(-1, marks.shape[-1])
    k = marks.shape[-1]
    if k * k <= num_neurons:
        pairs = (marks.unsqueeze(-1) * num_neurons + marks.unsqueeze(-2)).reshape(-1)
        return torch.bincount(pairs, minlength=num_neurons * num_neurons).view(num_neurons, num_neurons)
    dense = torch.zeros(marks.shape[0], num_neurons, dtype=torch.float32, device=marks.device)
    dense.scatter_(1, marks, 1.0)
    return (dense.T @ dense).round().long()


@dataclass
class ActivationStats:
    """Streaming CMoE statistics of one layer: tokens seen, mark counts and co-activation counts."""

    tokens: int
    counts: torch.Tensor
    coactivation: torch.Tensor

    @classmethod
    def empty(cls, num_neurons: int, device: torch.device | str = "cpu") -> "ActivationStats":
        return cls(
            tokens=0,
            counts=torch.zeros(num_neurons, dtype=torch.int64, device=device),
            coactivation=torch.zeros(num_neurons, num_neurons, dtype=torch.int64, device=device),
        )

    @property
    def num_neurons(self) -> int:
        return self.counts.numel()

    @property
    def rates(self) -> torch.Tensor:
        """Activation rate mu_i: fraction of tokens in which neuron i is marked."""
        return self.counts.double() / max(self.tokens, 1)

    def update(self, marks: torch.Tensor) -> None:
        marks = marks.reshape(-1, marks.shape[-1])
        self.tokens += marks.shape[0]
        self.counts += torch.bincount(marks.reshape(-1), minlength=self.num_neurons)
        self.coactivation += coactivation_counts(marks, self.num_neurons)

    def to(self, device: torch.device | str) -> "ActivationStats":
        return ActivationStats(self.tokens, self.counts.to(device), self.coactivation.to(device))
