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


__all__ = ["CMoEBlock", "CMoEConfig", "CMoEForCausalLM", "MoELayerSpec", "Router", "mean_active_neurons"]
