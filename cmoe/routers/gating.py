"""Gating rules: how the selected experts' outputs are weighted (see modeling_cmoe.select_experts)."""

from cmoe.modeling.configuration_cmoe import GATING_RULES
from cmoe.registry import Registry

GATINGS: Registry[str] = Registry("gating rule", "--gating")
GATINGS.register("cmoe", "the reference: 1 + p*u, exactly 1 for every selected expert until u is trained", "cmoe")
GATINGS.register(
    "softmax-renorm", "top-k of the softmax, weights renormalised (Qwen2-MoE, Mixtral, Ernie-4.5)", "softmax-renorm"
)
GATINGS.register(
    "sigmoid-renorm",
    "top-k of sigmoid scores plus a selection-only bias, renormalised (GLM4-MoE, DeepSeek-V3)",
    "sigmoid-renorm",
)
assert GATINGS.names() == GATING_RULES, "every rule the modeling code implements is registered, in its order"
