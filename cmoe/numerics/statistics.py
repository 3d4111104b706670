"""Neuron activation statistics, accumulated one batch of tokens at a time.

Nothing here keeps the tokens x d_h activation matrix: each batch's top-K_a marks are folded into
per-neuron counts and a d_h x d_h co-activation count matrix, which is all the reference grouping
needs (Hamming distances between binary mark columns follow from them). The optional statistics of
the quality options are streaming sums too: per-neuron output contributions, their d_h x d_h Gram
matrix (for k-means on co-activation), and the normal equations of a linear router fit.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch

from cmoe.registry import Registry

MarkStatistic = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict, Callable], torch.Tensor]
MARK_STATISTICS: Registry[MarkStatistic] = Registry("mark statistic", "--statistic")


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


def output_contribution(hidden: torch.Tensor, down_column_norms: torch.Tensor) -> torch.Tensor:
    """|h_i| * |W_down[:, i]|: how much neuron i can move the FFN output for this token."""
    return hidden.float().abs() * down_column_norms.float()


MARK_STATISTICS.register(
    "normalized",
    "the reference: the SwiGLU state of unit-norm tokens and weight rows",
    lambda x, gate, up, hidden, weights, act: normalized_swiglu_state(
        x, gate, up, weights["gate_row_norms"], weights["up_row_norms"], act
    ),
)
MARK_STATISTICS.register("raw", "the SwiGLU state h itself", lambda x, gate, up, hidden, weights, act: hidden.float())
MARK_STATISTICS.register(
    "contribution",
    "the output contribution |h_i| |W_down[:, i]|",
    lambda x, gate, up, hidden, weights, act: output_contribution(hidden, weights["down_column_norms"]),
)


def mark_statistic(
    kind: str, x: torch.Tensor, gate_out: torch.Tensor, up_out: torch.Tensor, hidden: torch.Tensor, weights: dict, act
) -> torch.Tensor:
    """The per-token neuron scores whose top-K_a become marks, by the registered statistic's name."""
    if kind not in MARK_STATISTICS:
        raise ValueError(f"unknown mark statistic {kind!r}")
    return MARK_STATISTICS.get(kind)(x, gate_out, up_out, hidden, weights, act)


def top_k_marks(state: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (tokens, k) of the k neurons with the largest |state| per token: the ones of the binary marks."""
    return state.abs().topk(k, dim=-1).indices


def coactivation_counts(marks: torch.Tensor, num_neurons: int) -> torch.Tensor:
    """(d_h, d_h) int32 counts of tokens in which neurons i and j are both marked (diagonal: marks of i)."""
    counts = torch.zeros(num_neurons, num_neurons, dtype=torch.int32, device=marks.device)
    add_coactivation(counts, marks)
    return counts


def add_coactivation(counts: torch.Tensor, marks: torch.Tensor) -> None:
    """Add one batch's co-activation counts into `counts` in place: each token's K_a^2 mark pairs are
    scattered into it, so no d_h x d_h temporary is made (at 70B's width one would be 6 GiB); a dense
    product only when K_a^2 exceeds d_h."""
    num_neurons = counts.shape[0]
    marks = marks.reshape(-1, marks.shape[-1])
    k = marks.shape[-1]
    if k * k <= num_neurons:
        pairs = (marks.unsqueeze(-1) * num_neurons + marks.unsqueeze(-2)).reshape(-1)
        ones = torch.ones(1, dtype=counts.dtype, device=counts.device).expand(pairs.numel())
        counts.view(-1).index_put_((pairs,), ones, accumulate=True)
        return
    dense = torch.zeros(marks.shape[0], num_neurons, dtype=torch.float32, device=marks.device)
    dense.scatter_(1, marks, 1.0)
    counts += (dense.T @ dense).round().to(counts.dtype)


def with_constant(x: torch.Tensor) -> torch.Tensor:
    """Tokens with a trailing 1: the design matrix of a linear map with an intercept."""
    return torch.cat([x.float(), x.new_ones(x.shape[0], 1, dtype=torch.float32)], dim=1)


OPTIONAL_STATISTICS = ("contribution_sum", "contribution_gram", "input_gram", "input_target")
# The d_h x d_h contribution Gram is by far the largest statistic (8 d_h^2 bytes per layer, 0.9 GiB at
# LLaMA-2-7B's width): a profile holds it only when asked (`cmoe profile --gram`, for `--grouping kmeans`).
PROFILE_STATISTICS = tuple(name for name in OPTIONAL_STATISTICS if name != "contribution_gram")
# Co-activation counts are int32 (half the memory of int64, on the device and on disk): exact while a
# layer sees fewer tokens than this (counts, and the Hamming distances built from them, stay below 2^31).
MAX_PROFILE_TOKENS = (1 << 30) - 1


@dataclass
class ActivationStats:
    """Streaming statistics of one layer: tokens seen, mark counts and co-activation counts, and
    (when asked for) the contribution sums, their Gram matrix and the router-fit normal equations."""

    tokens: int
    counts: torch.Tensor
    coactivation: torch.Tensor
    contribution_sum: torch.Tensor | None = None
    contribution_gram: torch.Tensor | None = None
    input_gram: torch.Tensor | None = None
    input_target: torch.Tensor | None = None
    extras: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def empty(
        cls, num_neurons: int, device: torch.device | str = "cpu", extras: tuple[str, ...] = (), hidden_size: int = 0
    ) -> "ActivationStats":
        """`extras` names the optional statistics to accumulate (see OPTIONAL_STATISTICS)."""
        unknown = set(extras) - set(OPTIONAL_STATISTICS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}")
        sizes = {
            "contribution_sum": (num_neurons,),
            "contribution_gram": (num_neurons, num_neurons),
            "input_gram": (hidden_size + 1, hidden_size + 1),
            "input_target": (hidden_size + 1, num_neurons),
        }
        optional = {name: torch.zeros(sizes[name], dtype=torch.float64, device=device) for name in extras}
        return cls(
            tokens=0,
            counts=torch.zeros(num_neurons, dtype=torch.int64, device=device),
            coactivation=torch.zeros(num_neurons, num_neurons, dtype=torch.int32, device=device),
            extras=tuple(extras),
            **optional,
        )

    @property
    def num_neurons(self) -> int:
        return self.counts.numel()

    @property
    def rates(self) -> torch.Tensor:
        """Activation rate mu_i: fraction of tokens in which neuron i is marked."""
        return self.counts.double() / max(self.tokens, 1)

    @property
    def mean_contribution(self) -> torch.Tensor:
        """Mean |h_i| |W_down[:, i]| over the calibration tokens."""
        if self.contribution_sum is None:
            raise ValueError("contribution statistics were not collected")
        return self.contribution_sum / max(self.tokens, 1)

    def update(
        self, marks: torch.Tensor, contribution: torch.Tensor | None = None, x: torch.Tensor | None = None
    ) -> None:
        """Fold one batch in: `marks` (tokens, K_a); `contribution` (tokens, d_h) and the FFN inputs
        `x` (tokens, d) feed the optional statistics that were asked for."""
        marks = marks.reshape(-1, marks.shape[-1])
        if self.tokens + marks.shape[0] > MAX_PROFILE_TOKENS:
            raise ValueError(
                f"more than {MAX_PROFILE_TOKENS} calibration tokens per layer: the int32 counts would overflow"
            )
        self.tokens += marks.shape[0]
        self.counts += torch.bincount(marks.reshape(-1), minlength=self.num_neurons)
        add_coactivation(self.coactivation, marks)
        if self.extras and contribution is None:
            raise ValueError(f"statistics {self.extras} need the batch's contributions")
        if self.contribution_sum is not None:
            self.contribution_sum += contribution.sum(dim=0).double()
        if self.contribution_gram is not None:
            self.contribution_gram += (contribution.T @ contribution).double()
        if self.input_gram is not None or self.input_target is not None:
            design = with_constant(x)
            if self.input_gram is not None:
                self.input_gram += (design.T @ design).double()
            if self.input_target is not None:
                self.input_target += (design.T @ contribution).double()

    def to(self, device: torch.device | str) -> "ActivationStats":
        optional = {name: getattr(self, name).to(device) for name in self.extras}
        return ActivationStats(
            self.tokens, self.counts.to(device), self.coactivation.to(device), extras=self.extras, **optional
        )
