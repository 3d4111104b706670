"""A stand-in for a dense gated MLP that computes it unchanged while recording CMoE statistics."""

import torch
from torch import nn

from cmoe.statistics import ActivationStats, normalized_swiglu_state, top_k_marks


class ProbedMLP(nn.Module):
    """Returns exactly the dense MLP's output; folds each batch's top-K_a marks into `stats`.

    With `keep_io`, the MLP inputs and outputs are kept on the CPU so the carved MLP's outputs can
    later replace the dense ones without re-running attention.
    """

    def __init__(self, dense: nn.Module, ka: int, act, keep_io: bool = False):
        super().__init__()
        self.dense = dense
        self.ka = ka
        self.act = act
        self.keep_io = keep_io
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        weight = dense.gate_proj.weight
        self.stats = ActivationStats.empty(weight.shape[0], device=weight.device)
        self._gate_norms = weight.float().norm(dim=1)
        self._up_norms = dense.up_proj.weight.float().norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.dense.gate_proj(x)
        up = self.dense.up_proj(x)
        out = self.dense.down_proj(self.act(gate) * up)
        flat = x.reshape(-1, x.shape[-1])
        state = normalized_swiglu_state(
            flat,
            gate.reshape(flat.shape[0], -1),
            up.reshape(flat.shape[0], -1),
            self._gate_norms.to(x.device),
            self._up_norms.to(x.device),
            self.act,
        )
        if self.stats.counts.device != x.device:
            self.stats = self.stats.to(x.device)
        self.stats.update(top_k_marks(state, self.ka))
        if self.keep_io:
            self.inputs.append(x.to("cpu"))
            self.outputs.append(out.to("cpu"))
        return out


class ShiftedMLP(nn.Module):
    """The dense MLP plus a constant: used once to check that a layer adds its MLP output to the residual."""

    def __init__(self, dense: nn.Module, shift: torch.Tensor):
        super().__init__()
        self.dense = dense
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.shift.to(x.dtype)
