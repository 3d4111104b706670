"""The construction-method registry: how one layer's evidence becomes a Partition of its neurons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from cmoe.errors import CmoeError
from cmoe.numerics.grouping import Partition
from cmoe.numerics.statistics import ActivationStats
from cmoe.registry import Registry

if TYPE_CHECKING:
    from cmoe.recipes import CarveOptions


@dataclass(frozen=True)
class LayerEvidence:
    """What a construction method may read about one layer: its mark statistics, the dense MLP, the
    gradient importance (groups, d_h) when the method asked for it, and the layer's index (for seeds)."""

    stats: ActivationStats
    dense: torch.nn.Module | None = None
    importance: torch.Tensor | None = None
    layer: int = 0


@dataclass(frozen=True)
class ConstructionMethod:
    """A way to split a layer's neurons into a Partition, with what it needs and allows:
    `needs_gradients` (the gradient pass, see cmoe.pipeline.gradients), `overlapping` experts,
    `shared_block` (whether S > 0 means something for it), `statistics(options)` (the optional
    statistics it reads under those options)."""

    build: Callable[[LayerEvidence, CarveOptions], Partition]
    needs_gradients: bool = False
    overlapping: bool = False
    shared_block: bool = True
    statistics: Callable[[CarveOptions], tuple[str, ...]] = lambda options: ()

    def __call__(self, stats: ActivationStats, options: CarveOptions, **evidence) -> Partition:
        return self.build(LayerEvidence(stats, **evidence), options)

    def check(self, name: str, options: CarveOptions) -> None:
        if options.shape.shared and not self.shared_block:
            raise CmoeError(
                f"--method {name} builds no shared expert: use S0 (e.g. --config "
                f"S0A{options.shape.active}E{options.shape.experts})"
            )


METHODS: Registry[ConstructionMethod] = Registry("construction method", "--method")
