"""GLM4-MoE: shared experts plus top-k routed experts under sigmoid scores with a selection-only bias
(`e_score_correction_bias`), renormalised, times a routed scaling factor of 1.

Leading dense layers map to `first_k_dense_replace`. Written for what its engines read: full rotary
(`partial_rotary_factor` 1.0; vLLM defaults to 0.5), no q/k norm, one expert group, an explicit LM head
(vLLM's glm4_moe does not tie), the bias always written, no multi-token-prediction layer.
"""

import torch

from cmoe.export.base import (
    EXPORT_FORMATS,
    CarvedView,
    ExportFormat,
    attention_tensors,
    common_config,
    experts_tensors,
    require_whole_shared_experts,
    swiglu_tensors,
)


def glm4_moe_config(view: CarvedView) -> dict:
    spec = view.spec
    values = common_config(view)
    values["rope_parameters"] = {**(values["rope_parameters"] or {}), "partial_rotary_factor": 1.0}
    return {
        **values,
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "intermediate_size": view.text_config.intermediate_size,
        "moe_intermediate_size": spec.expert_size,
        "n_shared_experts": spec.shared_size // spec.expert_size,
        "n_routed_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "first_k_dense_replace": len(view.dense_layers),
        "partial_rotary_factor": 1.0,
        "use_qk_norm": False,
        "attention_bias": False,
        "num_nextn_predict_layers": 0,
        "head_dim": view.text_config.hidden_size // view.text_config.num_attention_heads,
    }


def glm4_moe_layer(view: CarvedView, index: int) -> dict[str, torch.Tensor]:
    layer = view.layers[index]
    prefix = f"model.layers.{index}"
    tensors = attention_tensors(layer, prefix)
    block = layer.mlp
    if view.specs[index] is None:
        return {**tensors, **swiglu_tensors(block, f"{prefix}.mlp")}
    tensors[f"{prefix}.mlp.gate.weight"] = block.router.gate.weight
    tensors[f"{prefix}.mlp.gate.e_score_correction_bias"] = block.router.bias.float()
    return {**tensors, **experts_tensors(block, f"{prefix}.mlp")}


def _glm4_checks(view: CarvedView) -> None:
    require_whole_shared_experts(view)
    if view.spec.num_experts < 2:
        view.refuse(
            "it has one routed expert; GLM4-MoE's router ranks at least two", "carve at least two routed experts"
        )


EXPORT_FORMATS.register(
    "glm4-moe",
    "GLM4-MoE: shared experts + sigmoid top-k with a selection bias, renormalised (transformers, vLLM, SGLang)",
    ExportFormat(
        "glm4_moe",
        "sigmoid-renorm",
        glm4_moe_config,
        glm4_moe_layer,
        dense_layers="leading",
        selection_bias=True,
        untied_head=True,
        extra_check=_glm4_checks,
    ),
)
