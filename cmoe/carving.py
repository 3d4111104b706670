"""Profiling and carving: the layer loop that moves tensors, around the pure numerics."""

import json

import torch
from torch import nn
from transformers.activations import ACT2FN

from cmoe.artifacts import StageTimer, versions
from cmoe.blocks import build_block
from cmoe.configuration_cmoe import CMoEConfig
from cmoe.construction import METHODS
from cmoe.modeling_cmoe import CMoEForCausalLM
from cmoe.options import CarveOptions
from cmoe.probe import ProbedMLP
from cmoe.profile_io import FORMAT, ProfileFile, StreamingSafetensorsWriter, write_layer
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


def _carve_layer(dense: nn.Module, stats: ActivationStats, options: CarveOptions, act_name: str) -> nn.Module:
    partition = METHODS[options.method](stats, options)
    spec = options.shape.layer_spec(dense.gate_proj.weight.shape[0], options.router)
    return build_block(dense, partition, spec, act_name, stats)


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
    layer outputs, so each layer's attention runs once; otherwise the layer is re-run.
    """
    act_name = model.config.hidden_act
    runner = LayerRunner(model, windows, batch_size, device)
    with timer.stage("capture"):
        runner.capture()
        additive = runner.mlp_is_additive(0)
    _start(on_layer, len(runner.layers))
    for index, layer in enumerate(runner.layers):
        dense = layer.mlp
        probe = ProbedMLP(
            dense, options.ka, _activation(model), additive, options.statistic, options.needed_statistics()
        )
        saved_inputs = None if additive else [batch.hidden for batch in runner.batches]
        layer.mlp = probe
        try:
            with timer.stage("profile"):
                runner.run_layer(index)
        finally:
            layer.mlp = dense
        with timer.stage("group"):
            block = _carve_layer(dense.to(device), probe.stats, options, act_name)
            dense.to("cpu")
            block.to("cpu")
        with timer.stage("propagate"):
            if additive:
                runner.replace_mlp_outputs(block, probe.inputs, probe.outputs)
            else:
                for batch, hidden in zip(runner.batches, saved_inputs):
                    batch.hidden = hidden
            layer.mlp = block
            if not additive:
                runner.run_layer(index)
        if on_layer:
            on_layer(index + 1, len(runner.layers))
    return as_carved_model(model, options)


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
            layer.mlp = _carve_layer(layer.mlp, profile.layer(index), options, model.config.hidden_act)
        if on_layer:
            on_layer(index + 1, len(layers))
    return as_carved_model(model, options)


def as_carved_model(dense_model: nn.Module, options: CarveOptions) -> CMoEForCausalLM:
    """Wrap the dense model's modules (MLPs already replaced) in the carved architecture, sharing weights."""
    text_config = dense_model.config
    intermediate_size = text_config.intermediate_size
    spec = options.shape.layer_spec(intermediate_size, options.router)
    config = CMoEConfig(text_config=text_config.to_dict(), cmoe_layers=[spec] * text_config.num_hidden_layers)
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
