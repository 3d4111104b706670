"""Routers: how a carved layer picks its experts. Each file registers one in `ROUTERS`.

A router is a module class (a `cmoe.modeling.modeling_cmoe.Router` subclass, holding top-k, scale, bias
and the selection) and a builder that computes its weights from the dense MLP, the layer's Partition
and statistics. `ROUTERS.register(name, help, RouterKind(...))` adds both (the module class goes into
the modeling code's table, so carved models load), from anywhere: see README, Extending cmoe.
"""

from cmoe.routers.base import ROUTERS, RouterBuilder, RouterKind
from cmoe.routers import analytic, linear, linear_gate, noisy_topk  # noqa: F401  (each registers its router)
from cmoe.routers.gating import GATINGS

__all__ = ["GATINGS", "ROUTERS", "RouterBuilder", "RouterKind"]
