"""Profiling and carving: the layer loop that moves tensors, around the pure numerics."""

import json

import torch
from torch import nn
from transformers.activations import ACT2FN

from cmoe.artifacts import StageTimer, versions
from cmoe.blocks import build_block, refit_down_projections, scale_routed_outputs
from cmoe.budget import allocate_active_experts, selection_errors
from cmoe.configuration_cmoe import CMoEConfig
from cmoe.construction import METHODS
from cmoe.gradients import gradient_importance
from cmoe.methods import check_partition
from cmoe.modeling_cmoe import CMoEForCausalLM
from cmoe.options import CarveOptions
from cmoe.probe import ProbedMLP
from cmoe.profile_io import FORMAT, ProfileFile, StreamingSafetensorsWriter, write_layer
from cmoe.refit import REFIT_RIDGE
from cmoe.runner import LayerCallback, LayerRunner, decoder_of
from cmoe.statistics import OPTIONAL_STATISTICS, ActivationStats


def _activation(model: nn.Module):
    return ACT2FN[model.config.hidden_act]


def profile_model(
    model: nn.Module,
    windows: torch.Tensor,
    ka: int,
    batch_size: int,
    device: torch.device,
    writer: StreamingSafetensorsWriter,
    on_layer: LayerCallback | None = None,
    statistic: str = "normalized",
) -> None:
    """Profile the dense model layer by layer (each layer sees the dense outputs of the previous one).

    Every optional statistic is collected, so that one profile serves every carving option.
    """
    runner = LayerRunner(model, windows, batch_size, device)
    runner.capture()
    _start(on_layer, len(runner.layers))
    for index, layer in enumerate(runner.layers):
        dense = layer.mlp
        probe = ProbedMLP(dense, ka, _activation(model), statistic=statistic, extras=OPTIONAL_STATISTICS)
        layer.mlp = probe
        try:
            runner.run_layer(index)
        finally:
            layer.mlp = dense
        write_layer(writer, index, probe.stats.to("cpu"))
        if on_layer:
            on_layer(index + 1, len(runner.layers))


def _start(on_layer: LayerCallback | None, total: int) -> None:
    if on_layer:
        on_layer(0, total)


def profile_metadata(recipe: dict) -> dict[str, str]:
    return {"format": FORMAT, "recipe": json.dumps(recipe)}


def _carve_layer(
    dense: nn.Module, stats: ActivationStats, options: CarveOptions, act_name: str, layer: int, importance: torch.Tensor | None = None
) -> nn.Module:
    method = METHODS[options.method]
    partition = method(stats, options, dense=dense, importance=importance, layer=layer)
    check_partition(partition, stats.num_neurons, method.overlapping)
    spec = options.shape.layer_spec(dense.gate_proj.weight.shape[0], options.router)
    block = build_block(dense, partition, spec, act_name, stats, seed=options.seed * 1_000_003 + layer)
    if options.rescale:
        scale_routed_outputs(block, options.shape.routed / options.shape.active)
    return block


def carve_sequential(
    model: nn.Module,
    windows: torch.Tensor,
    options: CarveOptions,
    batch_size: int,
    device: torch.device,
    timer: StageTimer,
    on_layer: LayerCallback | None = None,
) -> CMoEForCausalLM:
    """The reference pipeline: layer l is profiled on the outputs of the already carved layers 0..l-1.

    For pre-norm layers (checked once) the carved MLP's output replaces the dense one in the stored
    layer outputs, so each layer's attention runs once; otherwise the layer is re-run. With the
    adaptive budget, each layer's output error for every number of active experts is measured on a
    sample of its calibration tokens, and the active experts are spread over the layers at the end.
    With `refit_down`, each carved layer's down projections are refitted to its dense outputs (on
    every calibration token) before the next layer is profiled.
    """
    act_name = model.config.hidden_act
    importance = None
    if METHODS[options.method].needs_gradients:
        with timer.stage("gradients"):
            importance = gradient_importance(model, windows, options.shape.routed, options.seed, batch_size, device)
    runner = LayerRunner(model, windows, batch_size, device)
    with timer.stage("capture"):
        runner.capture()
        additive = runner.mlp_is_additive(0)
    adaptive = options.budget == "adaptive"
    keep_io = additive or adaptive or options.refit_down
    layer_errors = []
    _start(on_layer, len(runner.layers))
    for index, layer in enumerate(runner.layers):
        dense = layer.mlp
        probe = ProbedMLP(
            dense, options.ka, _activation(model), keep_io, options.statistic, options.needed_statistics()
        )
        saved_inputs = None if additive else [batch.hidden for batch in runner.batches]
        layer.mlp = probe
        try:
            with timer.stage("profile"):
                runner.run_layer(index)
        finally:
            layer.mlp = dense
        with timer.stage("group"):
            layer_importance = None if importance is None else importance[index]
            block = _carve_layer(dense.to(device), probe.stats, options, act_name, index, layer_importance)
            dense.to("cpu")
        refitted = None
        if options.refit_down:
            with timer.stage("refit"):
                refitted = refit_down_projections(block.to(device), probe.inputs, probe.outputs, REFIT_RIDGE)
        if adaptive:
            with timer.stage("budget"):
                residual = [batch.hidden for batch in runner.batches]
                layer_errors.append(_relative_selection_errors(block.to(device), probe.inputs, probe.outputs, residual))
        block.to("cpu")
        with timer.stage("propagate"):
            if additive and refitted is not None:
                runner.swap_mlp_outputs(probe.outputs, refitted)
            elif additive:
                runner.replace_mlp_outputs(block, probe.inputs, probe.outputs)
            else:
                for batch, hidden in zip(runner.batches, saved_inputs):
                    batch.hidden = hidden
            layer.mlp = block
            if not additive:
                runner.run_layer(index)
        if on_layer:
            on_layer(index + 1, len(runner.layers))
    if adaptive:
        allocation = allocate_active_experts(torch.stack(layer_errors), len(runner.layers) * options.shape.active)
        for layer, active in zip(runner.layers, allocation):
            layer.mlp.top_k = layer.mlp.router.top_k = active
    return as_carved_model(model, options)


SELECTION_SAMPLE_TOKENS = 2048


def _sampled_rows(tensors: list[torch.Tensor], limit: int) -> torch.Tensor:
    """Every stride-th token of the batches (at most about `limit`), as (tokens, features) in fp32."""
    total = sum(tensor.shape[:-1].numel() for tensor in tensors)
    stride = max(1, -(-total // limit))
    return torch.cat([tensor.reshape(-1, tensor.shape[-1])[::stride].float() for tensor in tensors])


@torch.no_grad()
def _relative_selection_errors(block: nn.Module, inputs: list, outputs: list, residual: list) -> torch.Tensor:
    """The block's FFN output error for k = 0..R active experts on a token sample, each token's error
    relative to its residual stream's energy, averaged over tokens.

    Per token because the next layer's RMSNorm sees each token's direction: normalising by the total
    energy instead lets a few massive-activation tokens (SmolLM2 layer 11 on) hide every other token's
    error, and starves those layers (held-out wiki.valid, S1A1E8, linear router: 252 vs 397).
    """
    device = next(block.parameters()).device
    x = _sampled_rows(inputs, SELECTION_SAMPLE_TOKENS).to(device)
    target = _sampled_rows(outputs, SELECTION_SAMPLE_TOKENS).to(device)
    dtype = next(block.parameters()).dtype
    shared = block.shared(x.to(dtype)).float() if block.shared is not None else torch.zeros_like(target)
    experts = torch.stack([expert(x.to(dtype)).float() for expert in block.experts], dim=1)
    preference = block.router.probabilities(x.to(dtype)) + block.router.bias.float()
    energy = _sampled_rows(residual, SELECTION_SAMPLE_TOKENS).square().sum(dim=1).clamp_min(1e-12).to(device)
    return (selection_errors(target, shared, experts, preference, 1.0 / energy) / len(energy)).cpu()


def carve_from_profile(
    model: nn.Module,
    profile: ProfileFile,
    options: CarveOptions,
    timer: StageTimer,
    on_layer: LayerCallback | None = None,
) -> CMoEForCausalLM:
    """Carve every layer from a saved profile of the dense model: no calibration pass at all."""
    layers = decoder_of(model).layers
    _start(on_layer, len(layers))
    for index, layer in enumerate(layers):
        with timer.stage("group"):
            layer.mlp = _carve_layer(layer.mlp, profile.layer(index), options, model.config.hidden_act, index)
        if on_layer:
            on_layer(index + 1, len(layers))
    return as_carved_model(model, options)


def as_carved_model(dense_model: nn.Module, options: CarveOptions) -> CMoEForCausalLM:
    """Wrap the dense model's modules (MLPs already replaced) in the carved architecture, sharing weights."""
    text_config = dense_model.config
    spec = options.shape.layer_spec(text_config.intermediate_size, options.router)
    specs = [{**spec, "top_k": layer.mlp.top_k} for layer in decoder_of(dense_model).layers]
    config = CMoEConfig(text_config=text_config.to_dict(), cmoe_layers=specs)
    with torch.device("meta"):
        carved = CMoEForCausalLM(config)
    carved.model = dense_model.model
    carved.lm_head = dense_model.lm_head
    carved.config.text_config._attn_implementation = dense_model.config._attn_implementation
    carved.generation_config = dense_model.generation_config
    return carved.eval()


def carve_recipe(options: CarveOptions, **extra) -> dict:
    return {
        "tool": "cmoe carve",
        "config": options.shape.name,
        "shared_experts": options.shape.shared,
        "active_experts": options.shape.active,
        "experts": options.shape.experts,
        "active_fraction": options.shape.active_fraction,
        **options.as_recipe(),
        "versions": versions(),
        **extra,
    }
