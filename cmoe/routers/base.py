"""The router registry: a module class and the builder of its weights, under one name."""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cmoe.modeling.modeling_cmoe import ROUTER_CLASSES, Router
from cmoe.numerics.grouping import Partition
from cmoe.numerics.statistics import OPTIONAL_STATISTICS, ActivationStats
from cmoe.registry import Registry

RouterBuilder = Callable[[nn.Module, Partition, ActivationStats, int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RouterKind:
    """`module`: the Router subclass a carved layer holds; `build(dense, partition, stats, seed)`: its
    weights (every tensor of its state dict but `scale` and `bias`, which start at zero); `needs`: the
    optional statistics (see ActivationStats) the builder reads; `training_free`: usable without
    `cmoe finetune`; `follows_gating`: the module weights experts by the layer's gating rule (a router
    with its own gate, like noisy top-k, does not)."""

    module: type[Router]
    build: RouterBuilder
    needs: tuple[str, ...] = ()
    training_free: bool = True
    follows_gating: bool = True

    def __post_init__(self):
        if not (isinstance(self.module, type) and issubclass(self.module, Router)):
            raise TypeError(f"a router module must subclass cmoe's Router, got {self.module!r}")
        unknown = set(self.needs) - set(OPTIONAL_STATISTICS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {', '.join(OPTIONAL_STATISTICS)}")


def _add_module(name: str, kind: RouterKind) -> None:
    if not isinstance(kind, RouterKind):
        raise TypeError(f"router {name!r}: register a RouterKind, got {type(kind).__name__}")
    ROUTER_CLASSES[name] = kind.module


# Registering a router also makes its module class known to the modeling code, so carved models load.
ROUTERS: Registry[RouterKind] = Registry(
    "router", "--router", on_register=_add_module, on_unregister=lambda name: ROUTER_CLASSES.pop(name, None)
)
