"""Configuration of a carved (CMoE) causal LM.

Self-contained on purpose: this file is copied next to every carved checkpoint so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without cmoe installed.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class CMoEConfig(PreTrainedConfig):
    """A dense decoder's config (`text_config`) plus one MoE spec per decoder layer (`cmoe_layers`).

    Each entry of `cmoe_layers` is either None (the layer keeps its dense MLP) or a dict with
    `shared_size` (width of the always-on SwiGLU block, 0 for none), `num_experts` (routed experts),
    `expert_size` (neurons per routed expert), `top_k` (experts selected per token) and `router`
    (the router's registry name).
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


__all__ = ["CMoEConfig"]
