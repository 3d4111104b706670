"""The carved architecture: self-contained Hugging Face configuration and modeling code, copied into
every carved directory. Importing this package registers it with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(carved_dir)` works without `trust_remote_code`."""

from transformers import AutoConfig, AutoModelForCausalLM

from cmoe.modeling.configuration_cmoe import CMoEConfig, MoELayerSpec
from cmoe.modeling.modeling_cmoe import CMoEBlock, CMoEForCausalLM, Router

AutoConfig.register(CMoEConfig.model_type, CMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(CMoEConfig, CMoEForCausalLM, exist_ok=True)


def mean_active_neurons(config: CMoEConfig) -> float:
    """FFN neurons computed per token, averaged over layers (a dense layer computes all of them)."""
    widths = [spec.active_neurons if spec else config.text_config.intermediate_size for spec in config.layer_specs]
    return sum(widths) / len(widths)


def shared_experts_per_layer(config: CMoEConfig, experts: int) -> list[int | None]:
    """Each layer's number of shared experts in a carve of `experts` experts per layer (None for a dense
    layer): the experts that are not routed, exact whatever leftover neurons joined the shared block."""
    return [experts - spec.num_experts if spec else None for spec in config.layer_specs]


__all__ = [
    "CMoEBlock",
    "CMoEConfig",
    "CMoEForCausalLM",
    "MoELayerSpec",
    "Router",
    "mean_active_neurons",
    "shared_experts_per_layer",
]
