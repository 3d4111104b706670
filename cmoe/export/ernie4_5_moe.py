"""Ernie-4.5-MoE: shared experts plus top-k routed experts under a softmax gate, renormalised.

Its MoE layers are one contiguous run (`moe_layer_start_index` .. `moe_layer_end_index`), so dense layers
may lead and trail but not sit between carved ones. It rotates interleaved pairs (dims 2i, 2i+1) where
LLaMA rotates halves (i, i + d/2): the q and k rows of every head are permuted to match, which leaves
every attention score unchanged. Its selection bias (`e_score_correction_bias`) is written as zeros and
a carve that needs one is refused: vLLM's CPU path ignores it.
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


def interleaved_rope_rows(rows: int, head_dim: int) -> torch.Tensor:
    """Row order that turns half-split rotary heads into interleaved ones: within each head, new row
    2i is old row i and new row 2i + 1 is old row i + head_dim/2."""
    half = head_dim // 2
    within = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
    heads = torch.arange(rows // head_dim).unsqueeze(1) * head_dim
    return (heads + within).flatten()


def _head_dim(view: CarvedView) -> int:
    text = view.text_config
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _moe_range(view: CarvedView) -> tuple[int, int]:
    carved = [index for index, spec in enumerate(view.specs) if spec is not None]
    return carved[0], carved[-1]


def ernie4_5_moe_config(view: CarvedView) -> dict:
    spec = view.spec
    start, end = _moe_range(view)
    return {
        **common_config(view),
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "model_type": "ernie4_5_moe",
        "intermediate_size": view.text_config.intermediate_size,
        "moe_intermediate_size": spec.expert_size,
        "moe_num_shared_experts": spec.shared_size // spec.expert_size,
        "moe_num_experts": spec.num_experts,
        "moe_k": spec.top_k,
        "moe_layer_start_index": start,
        "moe_layer_end_index": end,
        "moe_layer_interval": 1,
        "moe_norm_min": 1e-12,
        "use_bias": False,
        "head_dim": _head_dim(view),
        "router_aux_loss_coef": 0.0,
    }


def ernie4_5_moe_layer(view: CarvedView, index: int) -> dict[str, torch.Tensor]:
    layer = view.layers[index]
    prefix = f"model.layers.{index}"
    tensors = attention_tensors(layer, prefix)
    for name in ("q_proj", "k_proj"):
        key = f"{prefix}.self_attn.{name}.weight"
        tensors[key] = tensors[key][interleaved_rope_rows(tensors[key].shape[0], _head_dim(view))]
    block = layer.mlp
    if view.specs[index] is None:
        return {**tensors, **swiglu_tensors(block, f"{prefix}.mlp")}
    tensors[f"{prefix}.mlp.gate.weight"] = block.router.gate.weight
    tensors[f"{prefix}.mlp.moe_statics.e_score_correction_bias"] = torch.zeros(1, view.spec.num_experts)
    return {**tensors, **experts_tensors(block, f"{prefix}.mlp")}


def _ernie_checks(view: CarvedView) -> None:
    require_whole_shared_experts(view)
    start, end = _moe_range(view)
    inside = [index for index in view.dense_layers if start < index < end]
    if inside:
        view.refuse(
            f"dense layer {inside[0]} sits between carved layers (its MoE layers are one contiguous run)",
            "carve a contiguous range of layers",
        )


EXPORT_FORMATS.register(
    "ernie4.5-moe",
    "Ernie-4.5-MoE: shared experts + softmax top-k, renormalised, interleaved rotary (transformers, vLLM)",
    ExportFormat("ernie4_5_moe", "softmax-renorm", ernie4_5_moe_config, ernie4_5_moe_layer, extra_check=_ernie_checks),
)
