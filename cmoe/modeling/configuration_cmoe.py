"""Configuration of a carved (CMoE) causal LM.

Self-contained on purpose: this file is copied next to every carved checkpoint so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without cmoe installed.
"""

from dataclasses import asdict, dataclass, fields

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The gating rules modeling_cmoe.select_experts implements.
GATING_RULES = ("cmoe", "softmax-renorm", "sigmoid-renorm")


@dataclass(frozen=True)
class MoELayerSpec:
    """One carved layer: the always-on shared block's width (0 for none), `num_experts` routed experts
    of `expert_size` neurons, `top_k` of them selected per token, by the router registered as `router`,
    weighted by the gating rule `gating` (see modeling_cmoe.select_experts)."""

    shared_size: int
    num_experts: int
    expert_size: int
    top_k: int
    router: str = "analytic"
    gating: str = "cmoe"

    def __post_init__(self):
        for name in ("shared_size", "num_experts", "expert_size", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MoE layer spec: {name} must be a non-negative integer, got {value!r}")
        if self.num_experts < 1 or self.expert_size < 1:
            raise ValueError(f"MoE layer spec: needs at least one routed expert of at least one neuron, got {self}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoE layer spec: top_k {self.top_k} exceeds the {self.num_experts} routed experts")
        if self.gating not in GATING_RULES:
            raise ValueError(
                f"MoE layer spec: unknown gating {self.gating!r}, expected one of {', '.join(GATING_RULES)}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> "MoELayerSpec":
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MoE layer spec: unknown keys {unknown}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def active_neurons(self) -> int:
        return self.shared_size + self.top_k * self.expert_size


class CMoEConfig(PreTrainedConfig):
    """A dense decoder's config (`text_config`) plus one MoE spec per decoder layer (`cmoe_layers`).

    Each entry of `cmoe_layers` is either None (the layer keeps its dense MLP) or a MoELayerSpec as a
    dict (the JSON form); `layer_specs` gives them typed, and every entry is validated on load.
    """

    model_type = "cmoe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    cmoe_layers: list | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.cmoe_layers is None:
            self.cmoe_layers = [None] * self.text_config.num_hidden_layers
        if len(self.cmoe_layers) != self.text_config.num_hidden_layers:
            raise ValueError(
                f"cmoe_layers has {len(self.cmoe_layers)} entries for {self.text_config.num_hidden_layers} layers"
            )
        layers = []
        for index, spec in enumerate(self.cmoe_layers):
            try:
                layers.append(None if spec is None else _as_spec(spec).to_dict())
            except (ValueError, TypeError) as error:
                raise ValueError(f"cmoe_layers: layer {index}: {error}") from None
        self.cmoe_layers = layers

    @property
    def layer_specs(self) -> list[MoELayerSpec | None]:
        return [None if spec is None else MoELayerSpec.from_dict(spec) for spec in self.cmoe_layers]


# save_pretrained then maps AutoConfig to this class in `auto_map` and copies this file next to the weights.
CMoEConfig.register_for_auto_class()


def _as_spec(spec) -> MoELayerSpec:
    return spec if isinstance(spec, MoELayerSpec) else MoELayerSpec.from_dict(dict(spec))


__all__ = ["CMoEConfig", "MoELayerSpec"]
