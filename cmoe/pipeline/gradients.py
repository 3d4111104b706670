"""The gradient pass of the Sharing methods: per data group and layer, importance `sum |h * dL/dh|`.

Calibration tokens are first grouped (one group per routed expert) by spherical k-means on their input
embeddings: LLaMA-MoE pre-clusters its data, and with a handful of calibration windows a token-level
grouping is the only one with enough groups. Then every window batch runs forward and backward through
the whole dense model under the LM loss; a hook on each MLP's `down_proj` input h folds |h * dL/dh| into
a (groups, d_h) sum per layer, so memory does not grow with the number of windows: it is the whole model
plus one batch's activations and their gradients (no weight gradients are kept).
"""

import torch
from torch import nn

from cmoe.numerics.assignment import spherical_kmeans
from cmoe.numerics.importance import accumulate_importance
from cmoe.pipeline.runner import decoder_of


def token_groups(
    windows: torch.Tensor, embedding: torch.Tensor, num_groups: int, seed: int, iterations: int = 20
) -> torch.Tensor:
    """(windows, seqlen) group of each calibration token: k-means over the distinct tokens' embeddings,
    weighted by how often they occur."""
    distinct, position, occurrences = windows.unique(return_inverse=True, return_counts=True)
    labels = spherical_kmeans(embedding[distinct].float(), occurrences, num_groups, iterations, seed)
    return labels[position]


def gradient_importance(
    model: nn.Module, windows: torch.Tensor, num_groups: int, seed: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """(layers, groups, d_h) float64 importance of every FFN neuron per data group, on the CPU."""
    layers = decoder_of(model).layers
    width = layers[0].mlp.down_proj.in_features
    groups = token_groups(windows, model.get_input_embeddings().weight.detach().cpu(), num_groups, seed)
    importance = torch.zeros(len(layers), num_groups, width, dtype=torch.float64, device=device)
    batch_groups: dict[str, torch.Tensor] = {}

    def capture(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            # The gradient hook must hold a detached view, not `args[0]` itself: a tensor whose own hook
            # refers to it forms a cycle through autograd that Python never frees (one activation per layer
            # and batch leaked).
            values = args[0].detach().reshape(-1, width)
            labels = batch_groups["current"]
            args[0].register_hook(
                lambda grad: accumulate_importance(importance[index], values, grad.reshape(-1, width), labels)
            )

        return hook

    trainable = [parameter.requires_grad for parameter in model.parameters()]
    handles = [layer.mlp.down_proj.register_forward_pre_hook(capture(index)) for index, layer in enumerate(layers)]
    model.to(device)
    try:
        model.requires_grad_(False)
        with torch.enable_grad():
            for ids, labels in zip(windows.split(batch_size), groups.split(batch_size)):
                ids = ids.to(device)
                batch_groups["current"] = labels.reshape(-1).to(device)
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
                torch.autograd.backward(loss, inputs=[embeds])
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(model.parameters(), trainable):
            parameter.requires_grad_(flag)
        model.to("cpu")
    return importance.cpu()
