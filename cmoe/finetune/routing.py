"""The routers during fine-tuning: counting each expert's tokens, the sign-rule update of the balancing
bias b, and the routing load reported before and after training."""

import torch
from torch import nn

from cmoe.finetune.evaluation import windows_nll
from cmoe.modeling import CMoEBlock
from cmoe.numerics.routing_stats import load_fractions
from cmoe.numerics.training import balancing_direction

LOAD_BATCH_SIZE = 2


class RoutingMeter:
    """Forward hooks on every CMoE router: token counts per expert and any `balance_loss` a router sets.

    Only counts while `active`, so evaluation passes and gradient-checkpointing recomputation during the
    backward pass are not counted twice.
    """

    def __init__(self, model: nn.Module):
        self.routers = [module.router for module in model.modules() if isinstance(module, CMoEBlock)]
        self.counts = [torch.zeros(router.bias.numel(), dtype=torch.long) for router in self.routers]
        self.balance_losses: list[torch.Tensor] = []
        self.active = False
        self._handles = [router.register_forward_hook(self._hook(index)) for index, router in enumerate(self.routers)]

    def _hook(self, index: int):
        def record(module: nn.Module, args, routing) -> None:
            if not self.active:
                return
            counts = torch.bincount(routing.indices.reshape(-1), minlength=self.counts[index].numel())
            self.counts[index] = self.counts[index].to(counts.device) + counts
            balance_loss = getattr(module, "balance_loss", None)
            if isinstance(balance_loss, torch.Tensor):
                self.balance_losses.append(balance_loss)

        return record

    def take_balance_loss(self) -> torch.Tensor | None:
        """The summed balance loss of the forward passes since the last call (None when no router set one)."""
        losses, self.balance_losses = self.balance_losses, []
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def take_counts(self) -> list[torch.Tensor]:
        """Per-router token counts per expert since the last call."""
        counts = self.counts
        self.counts = [torch.zeros_like(count) for count in counts]
        return counts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def update_biases(meter: RoutingMeter, speed: float, accelerator) -> None:
    """DeepSeek-V3's loss-free balancing step on every router's bias b, on the loads summed over processes."""
    for router, counts in zip(meter.routers, meter.take_counts(), strict=True):
        loads = accelerator.reduce(counts.to(accelerator.device), reduction="sum")
        router.bias.add_(speed * balancing_direction(loads).to(router.bias.device, router.bias.dtype))


@torch.no_grad()
def routing_load(model: nn.Module, meter: RoutingMeter, windows: torch.Tensor, accelerator) -> list[list[float]]:
    """Share of routed assignments per expert, per carved layer, on the probe windows."""
    meter.take_counts()
    meter.active = True
    windows_nll(model, windows, LOAD_BATCH_SIZE, accelerator.device, accelerator.autocast)
    meter.active = False
    meter.take_balance_loss()
    return [load_fractions(counts.cpu()) for counts in meter.take_counts()]
