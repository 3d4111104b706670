"""Qwen2-MoE: a sigmoid-gated shared expert plus top-k routed experts under a softmax gate, renormalised.

Dense layers map to `mlp_only_layers`. The shared expert is multiplied by sigmoid(shared_expert_gate x):
a zero gate gives 0.5, so its down projection is written doubled. vLLM's qwen2_moe always reads q/k/v
biases: zeros are written (`qkv_bias`).
"""

import torch

from cmoe.export.base import EXPORT_FORMATS, CarvedView, ExportFormat, attention_tensors, common_config, swiglu_tensors


def qwen2_moe_config(view: CarvedView) -> dict:
    spec = view.spec
    return {
        **common_config(view),
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "intermediate_size": view.text_config.intermediate_size,
        "moe_intermediate_size": spec.expert_size,
        "shared_expert_intermediate_size": spec.shared_size,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": view.dense_layers,
        "qkv_bias": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "router_aux_loss_coef": 0.0,
    }


def qwen2_moe_layer(view: CarvedView, index: int) -> dict[str, torch.Tensor]:
    layer = view.layers[index]
    prefix = f"model.layers.{index}"
    tensors = attention_tensors(layer, prefix)
    for name in ("q_proj", "k_proj", "v_proj"):
        projection = getattr(layer.self_attn, name)
        tensors[f"{prefix}.self_attn.{name}.bias"] = torch.zeros(projection.out_features, dtype=projection.weight.dtype)
    block = layer.mlp
    if view.specs[index] is None:
        return {**tensors, **swiglu_tensors(block, f"{prefix}.mlp")}
    tensors[f"{prefix}.mlp.gate.weight"] = block.router.gate.weight
    for expert_index, expert in enumerate(block.experts):
        tensors.update(swiglu_tensors(expert, f"{prefix}.mlp.experts.{expert_index}"))
    shared = swiglu_tensors(block.shared, f"{prefix}.mlp.shared_expert")
    shared[f"{prefix}.mlp.shared_expert.down_proj.weight"] = 2.0 * block.shared.down_proj.weight
    tensors.update(shared)
    hidden = view.text_config.hidden_size
    tensors[f"{prefix}.mlp.shared_expert_gate.weight"] = torch.zeros(
        1, hidden, dtype=block.shared.down_proj.weight.dtype
    )
    return tensors


def _needs_shared_block(view: CarvedView) -> None:
    if view.spec.shared_size == 0:
        view.refuse("it has no shared block, which Qwen2-MoE always computes", "use --format mixtral for S0 carves")


EXPORT_FORMATS.register(
    "qwen2-moe",
    "Qwen2-MoE: shared expert + softmax top-k, renormalised (transformers, vLLM, SGLang, llama.cpp)",
    ExportFormat("qwen2_moe", "softmax-renorm", qwen2_moe_config, qwen2_moe_layer, extra_check=_needs_shared_block),
)
