"""A stand-in for a dense gated MLP that computes it unchanged while recording CMoE statistics."""

import torch
from torch import nn

from cmoe.numerics.statistics import ActivationStats, mark_statistic, output_contribution, top_k_marks


class ProbedMLP(nn.Module):
    """Returns exactly the dense MLP's output; folds each batch's top-K_a marks (of the `statistic`
    named) and the optional `extras` statistics into `stats`.

    With `keep_io`, the MLP inputs and outputs are kept on the CPU so the carved MLP's outputs can
    later replace the dense ones without re-running attention.
    """

    def __init__(
        self,
        dense: nn.Module,
        ka: int,
        act,
        keep_io: bool = False,
        statistic: str = "normalized",
        extras: tuple[str, ...] = (),
    ):
        super().__init__()
        self.dense = dense
        self.ka = ka
        self.act = act
        self.keep_io = keep_io
        self.statistic = statistic
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        weight = dense.gate_proj.weight
        self.stats = ActivationStats.empty(weight.shape[0], weight.device, extras, hidden_size=weight.shape[1])
        self._norms = {
            "gate_row_norms": weight.float().norm(dim=1),
            "up_row_norms": dense.up_proj.weight.float().norm(dim=1),
            "down_column_norms": dense.down_proj.weight.float().norm(dim=0),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.dense.gate_proj(x)
        up = self.dense.up_proj(x)
        hidden = self.act(gate) * up
        out = self.dense.down_proj(hidden)
        flat = x.reshape(-1, x.shape[-1])
        tokens = flat.shape[0]
        norms = {name: value.to(x.device) for name, value in self._norms.items()}
        gate, up, hidden = (tensor.reshape(tokens, -1) for tensor in (gate, up, hidden))
        state = mark_statistic(self.statistic, flat, gate, up, hidden, norms, self.act)
        if self.stats.counts.device != x.device:
            self.stats = self.stats.to(x.device)
        contribution = output_contribution(hidden, norms["down_column_norms"]) if self.stats.extras else None
        self.stats.update(top_k_marks(state, self.ka), contribution, flat)
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
