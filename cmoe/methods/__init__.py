"""Expert construction methods: how a layer's neurons are split into shared and routed experts.

Each file registers one method in `METHODS` (see README, Extending cmoe); the CMoE method's own
options (shared ranking, grouping, representative) are registries in cmoe.methods.cmoe.
"""

from cmoe.methods.base import METHODS, ConstructionMethod, LayerEvidence
from cmoe.methods import cmoe  # noqa: F401  (each import registers its method, in the order --help lists them)
from cmoe.methods import random  # noqa: F401
from cmoe.methods import clustering  # noqa: F401
from cmoe.methods import sharing_inner  # noqa: F401
from cmoe.methods import sharing_inter  # noqa: F401
from cmoe.methods.cmoe import GROUPINGS, REPRESENTATIVES, SHARED_BY

__all__ = ["GROUPINGS", "METHODS", "REPRESENTATIVES", "SHARED_BY", "ConstructionMethod", "LayerEvidence"]
