"""The carving shape `S{shared}A{active}E{experts}` and its validation."""

import re
from dataclasses import dataclass

from cmoe.errors import CmoeError
from cmoe.modeling.configuration_cmoe import MoELayerSpec

_PATTERN = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class MoEShape:
    """N_s shared experts, N_k routed experts active per token, N experts in all."""

    shared: int
    active: int
    experts: int

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    @property
    def name(self) -> str:
        return f"S{self.shared}A{self.active}E{self.experts}"

    @property
    def active_fraction(self) -> float:
        return (self.shared + self.active) / self.experts

    @classmethod
    def parse(cls, text: str) -> "MoEShape":
        match = _PATTERN.match(text.strip())
        if not match:
            raise CmoeError(f"invalid --config {text!r}: expected S<shared>A<active>E<experts>, e.g. S3A3E8")
        return cls(*(int(group) for group in match.groups())).validated()

    def validated(self, intermediate_size: int | None = None) -> "MoEShape":
        """Check the counts, and against the model's FFN width when it is known."""
        if self.experts <= 0:
            raise CmoeError(f"{self.name}: the number of experts must be positive")
        if self.active <= 0:
            raise CmoeError(f"{self.name}: the number of active routed experts must be positive")
        if self.shared < 0:
            raise CmoeError(f"{self.name}: the number of shared experts cannot be negative")
        if self.shared + self.active > self.experts:
            raise CmoeError(
                f"{self.name}: shared + active ({self.shared + self.active}) exceeds the number of experts "
                f"({self.experts})"
            )
        if intermediate_size is not None and self.experts > intermediate_size:
            raise CmoeError(f"{self.name}: {self.experts} experts exceed the FFN width ({intermediate_size} neurons)")
        return self

    def layer_spec(self, intermediate_size: int, router: str, gating: str = "cmoe") -> MoELayerSpec:
        """The per-layer entry of a carved config (see CMoEConfig); leftovers join the shared block."""
        expert_size = intermediate_size // self.experts
        return MoELayerSpec(
            shared_size=self.shared * expert_size + intermediate_size % self.experts,
            num_experts=self.routed,
            expert_size=expert_size,
            top_k=self.active,
            router=router,
            gating=gating,
        )
