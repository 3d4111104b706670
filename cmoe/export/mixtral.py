"""Mixtral: top-k routed experts under a softmax gate, renormalised; no shared block, no dense layer."""

import torch

from cmoe.export.base import EXPORT_FORMATS, CarvedView, ExportFormat, attention_tensors, common_config, swiglu_tensors


def mixtral_config(view: CarvedView) -> dict:
    spec = view.spec
    return {
        **common_config(view),
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "intermediate_size": spec.expert_size,
        "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "router_jitter_noise": 0.0,
        "router_aux_loss_coef": 0.0,
        "sliding_window": None,
    }


def mixtral_layer(view: CarvedView, index: int) -> dict[str, torch.Tensor]:
    layer = view.layers[index]
    prefix = f"model.layers.{index}"
    tensors = attention_tensors(layer, prefix)
    block = layer.mlp
    tensors[f"{prefix}.block_sparse_moe.gate.weight"] = block.router.gate.weight
    for expert_index, expert in enumerate(block.experts):
        tensors.update(swiglu_tensors(expert, f"{prefix}.block_sparse_moe.experts.{expert_index}", ("w1", "w3", "w2")))
    return tensors


EXPORT_FORMATS.register(
    "mixtral",
    "Mixtral: softmax top-k, renormalised, no shared experts (S0 carves only)",
    ExportFormat("mixtral", "softmax-renorm", mixtral_config, mixtral_layer, shared_block=False, dense_layers="none"),
)
