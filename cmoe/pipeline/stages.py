"""The pipeline's stages: statistics, grouping, refit, budget, routing counts, NLL, profile writing.

Each stage is small and declares what it needs (see cmoe.pipeline.sequential.Stage); commands compose
them (see `carve_stages`). Numerics come from cmoe.numerics; this module moves tensors.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from cmoe.errors import CmoeError
from cmoe.io.carved import layer_tensors
from cmoe.io.profile_format import ProfileFile, StreamingSafetensorsWriter, write_layer
from cmoe.io.shards import ShardWriter
from cmoe.methods import METHODS
from cmoe.modeling.configuration_cmoe import CMoEConfig, MoELayerSpec
from cmoe.modeling.modeling_cmoe import CMoEBlock, CMoEForCausalLM
from cmoe.numerics.budget import allocate_active_experts, selection_errors
from cmoe.numerics.grouping import check_partition, layer_seed
from cmoe.numerics.reconstruction import token_weights
from cmoe.pipeline.blocks import (
    build_block,
    down_projections,
    refit_down_projections,
    refit_router_scores,
    router_projection,
    scale_routed_outputs,
)
from cmoe.pipeline.gradients import gradient_importance
from cmoe.pipeline.reconstruct import reconstruct_block
from cmoe.pipeline.runner import decoder_of
from cmoe.pipeline.sequential import CALIBRATION, MLP_IO, LayerWork, Pipeline, Stage, StatisticsRequest
from cmoe.registry import Registry
from cmoe.shape import MoEShape

if TYPE_CHECKING:
    from cmoe.recipes import CarveOptions


class Statistics(Stage):
    """Record the layer's mark statistics (and the optional ones asked for) while it runs."""

    name = "profile"
    needs = frozenset({CALIBRATION})

    def __init__(self, ka: int, statistic: str, extras: tuple[str, ...]):
        self.request = StatisticsRequest(ka, statistic, tuple(extras))

    def statistics(self) -> StatisticsRequest:
        return self.request


class SavedStatistics(Stage):
    """Read each layer's statistics from a profile of the dense model instead of measuring them (the
    file is opened when the pipeline starts, so building the stages reads nothing)."""

    name = "load_profile"

    def __init__(self, path: Path):
        self.path = path
        self.profile: ProfileFile | None = None

    def begin(self, pipeline: Pipeline) -> None:
        self.profile = ProfileFile(self.path)

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        work.stats = self.profile.layer(work.index)


class WriteProfile(Stage):
    """Append each layer's statistics to a profile file as soon as the layer is done."""

    name = "write_profile"

    def __init__(self, writer: StreamingSafetensorsWriter):
        self.writer = writer

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        write_layer(self.writer, work.index, work.stats.to("cpu"))


class WriteCarvedLayer(Stage):
    """Write each layer to its output shard as soon as it is final (a lazy carve then releases it)."""

    name = "write"

    def __init__(self, writer: ShardWriter):
        self.writer = writer

    def after(self, pipeline: Pipeline, work: LayerWork) -> None:
        with pipeline.timer.stage(self.name):
            self.writer.write(work.index + 1, layer_tensors(work.layer, work.index))

    def restore(self, pipeline: Pipeline, state, done: int) -> None:
        for index in range(done):
            self.writer.adopt(index + 1)


class GradientImportance(Stage):
    """Before the layer loop: the whole-model gradient pass of LLaMA-MoE's Sharing methods."""

    name = "gradients"
    needs = frozenset({CALIBRATION})

    def __init__(self, method: str, groups: int, seed: int, batch_size: int):
        self.refusal = f"--method {method} needs a gradient pass over calibration data: drop --profile"
        self.groups, self.seed, self.batch_size = groups, seed, batch_size
        self.importance: torch.Tensor | None = None

    def begin(self, pipeline: Pipeline) -> None:
        with pipeline.timer.stage(self.name):
            self.importance = gradient_importance(
                pipeline.model, pipeline.windows, self.groups, self.seed, self.batch_size, pipeline.device
            )


class BuildBlock(Stage):
    """Split the layer's neurons by the construction method and build its MoE block (on the compute
    device when the layer ran there; on the CPU, where the statistics are, when carving from a profile)."""

    name = "group"
    builds_block = True
    needs_targets = False

    def __init__(self, options: CarveOptions, gradients: GradientImportance | None = None):
        self.options = options
        self.gradients = gradients

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        with pipeline.timer.stage(self.name):
            dense = work.dense.to(pipeline.device if pipeline.runner is not None else "cpu")
            importance = None if self.gradients is None else self.gradients.importance[work.index]
            work.block = carve_block(
                dense, work.stats, self.options, pipeline.model.config.hidden_act, work.index, importance
            )
            dense.to("cpu")
        # Nothing after the block is built reads the statistics: free them (the co-activation counts alone
        # are 3 GiB at 70B's width) before the refit needs its own d_h x d_h system.
        work.stats = None

    def layer_options(self, index: int) -> CarveOptions:
        """The options layer `index` was carved with."""
        return self.options

    def restore(self, pipeline: Pipeline, state, done: int) -> None:
        """The layers a resumed carve skips were written already: they keep only their block's shape."""
        config = pipeline.model.config
        for index, layer in enumerate(list(pipeline.layers)[:done]):
            spec = self.layer_options(index).layer_spec(config.intermediate_size, index)
            with torch.device("meta"):
                layer.mlp = CMoEBlock(config.hidden_size, config.hidden_act, spec)


SHARED_SAMPLE_TOKENS = 8192


class AdaptiveSharedBlock(BuildBlock):
    """--shared-width adaptive: carve each layer with every shared-expert count within one of the shape's,
    at the same number of active experts per token (shared + routed, so the same FFN cost), and keep the
    block with the lowest error on the calibration tokens. Each candidate is refitted on one token sample
    when the carve refits, and scored on another, disjoint one (each token's error relative to its
    residual stream's energy, as the adaptive budget measures it); the block kept is the unrefitted one,
    which the carve's own stages then fit on every token. Each layer's candidates and their errors go to
    the carve's record (`shared_width_errors`)."""

    name = "shared_width"
    needs = frozenset({CALIBRATION, MLP_IO})
    needs_targets = True
    refusal = (
        "--shared-width adaptive scores each layer's candidates on calibration data: drop --profile or pass "
        "--shared-width uniform"
    )

    def __init__(self, options: CarveOptions):
        super().__init__(options)
        self.chosen: list[int] = []
        self.errors: list[dict] = []

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        options = self.options
        with pipeline.timer.stage(self.name):
            dense = work.dense.to(pipeline.device)
            residual = [batch.hidden for batch in pipeline.runner.batches]
            samples = [
                _sampled_rows(tensors, 2 * SHARED_SAMPLE_TOKENS).to(pipeline.device)
                for tensors in (work.inputs, work.fit_targets, residual)
            ]
            samples[2] = samples[2].square().sum(dim=1, keepdim=True)
            (fit_x, fit_y, _), held_out = [sample[0::2] for sample in samples], [sample[1::2] for sample in samples]
            scores: dict[int, float] = {}
            best: int | None = None
            for shape in shared_candidates(options.shape):
                candidate = carve_block(
                    dense, work.stats, replace(options, shape=shape), pipeline.model.config.hidden_act, work.index
                )
                scored = candidate
                if options.refit_down:  # on a copy: the carve's own refit starts from the carved weights
                    scored = copy.deepcopy(candidate)
                    refit_down_projections(scored, [fit_x], [fit_y], options.refit_ridge, options.refit_ridge_scale)
                scores[shape.shared] = held_out_error(scored, *held_out)
                if best is None or scores[shape.shared] < scores[best]:
                    best, work.block = shape.shared, candidate
                scored = candidate = None  # only the best block so far stays on the device
            dense.to("cpu")
        self.chosen.append(best)
        candidates = [{"shared": shared, "error": float(f"{error:.6g}")} for shared, error in scores.items()]
        self.errors.append({"layer": work.index, "chosen": best, "candidates": candidates})
        work.stats = None

    def layer_options(self, index: int) -> CarveOptions:
        return replace(self.options, shape=shared_variant(self.options.shape, self.chosen[index]))

    def state(self) -> tuple[list[int], list[dict]]:
        return self.chosen, self.errors

    def restore(self, pipeline: Pipeline, state, done: int) -> None:
        self.chosen, self.errors = list(state[0]), list(state[1])
        super().restore(pipeline, state, done)

    def report(self) -> dict:
        return {"shared_width_errors": self.errors}


class Rescale(Stage):
    """Multiply the selected experts' outputs by n/k (LLaMA-MoE), folded exactly into their down_proj."""

    name = "rescale"

    def __init__(self, factor: float):
        self.factor = factor

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        scale_routed_outputs(work.block, self.factor)


FLAT_GATE_FACTOR = 1e-3


class FlattenGate(Stage):
    """Under a renormalising rule, make every selected expert weigh about 1, as under the cmoe rule: the
    linear router's logits are scaled by FLAT_GATE_FACTOR (same selection: top-k of a positive multiple)
    so the renormalised weights are 1/k within about 0.1%, and the routed experts' outputs by k, folded
    into their down projections. Measured: SmolLM2 S3A3E8 `--preset quality --format qwen2-moe`, wiki.test
    perplexity 48.2 without it (the renormalised weights vary per token, which the refit cannot absorb)."""

    name = "flatten_gate"

    def __init__(self, top_k: int):
        self.top_k = top_k

    @torch.no_grad()
    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        router = work.block.router
        for name, parameter in router.named_parameters():
            if name != "scale":
                parameter.mul_(FLAT_GATE_FACTOR)
        scale_routed_outputs(work.block, float(self.top_k))


class DenseStreamTargets(Stage):
    """Move the targets of the refit and the reconstruction from the dense FFN's output on the carved
    inputs towards what makes the carved layer's output the dense model's: the dense model's own stream
    runs beside the carved one, and `drift` of their difference after this layer is added to the target,
    so the block also corrects what the carved layers below changed (where its inputs can tell)."""

    name = "dense_stream"
    needs = frozenset({CALIBRATION, MLP_IO})
    refusal = (
        "--refit-drift (part of --preset quality) follows the dense model's stream on calibration data: drop "
        "--profile or pass --refit-drift 0 (or --no-refit-down and --reconstruct-steps 0)"
    )

    def __init__(self, drift: float):
        self.drift = drift
        self.dense_hidden: list[torch.Tensor] | None = None

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        if not pipeline.additive:
            raise CmoeError("--refit-drift needs layers that add their MLP output to the residual stream")
        runner = pipeline.runner
        with pipeline.timer.stage(self.name):
            if self.dense_hidden is None:  # layer 0: both streams start from the embeddings
                self.dense_hidden = [batch.hidden for batch in runner.batches]
            else:
                for position, output in enumerate(runner.layer_outputs(work.index, self.dense_hidden)):
                    self.dense_hidden[position] = output
            work.targets = [
                (y.float() + self.drift * (dense.float() - batch.hidden.float()).view(y.shape))
                for y, dense, batch in zip(work.outputs, self.dense_hidden, runner.batches)
            ]

    def state(self) -> list[torch.Tensor] | None:
        return self.dense_hidden

    def restore(self, pipeline: Pipeline, state, done: int) -> None:
        self.dense_hidden = None if state is None else list(state)


class Refit(Stage):
    """Refit the block's down projections to the dense outputs on this layer's calibration tokens."""

    name = "refit"
    needs = frozenset({CALIBRATION, MLP_IO})
    refusal = (
        "--refit-down (part of --preset quality) fits each carved layer to its dense outputs on calibration data: "
        "drop --profile or pass --no-refit-down"
    )

    def __init__(self, ridge: float, scale: str, keep_carved: bool = False, weighting: str = "uniform"):
        self.ridge = ridge
        self.scale = scale
        self.keep_carved = keep_carved
        self.weighting = weighting

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        with pipeline.timer.stage(self.name):
            if self.keep_carved:
                work.carved_down = [down.weight.detach().clone() for down in down_projections(work.block)]
            weights = None
            if self.weighting != "uniform":
                weights = residual_token_weights(self.weighting, [batch.hidden for batch in pipeline.runner.batches])
            work.block_outputs = refit_down_projections(
                work.block.to(pipeline.device), work.inputs, work.fit_targets, self.ridge, self.scale, weights
            )


def residual_token_weights(rule: str, residual: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each batch's (tokens,) weights under `rule` from its residual stream's energies, scaled to mean 1
    over every batch's tokens together."""
    energies = [hidden.reshape(-1, hidden.shape[-1]).float().square().sum(dim=1) for hidden in residual]
    return list(token_weights(rule, torch.cat(energies)).split([len(energy) for energy in energies]))


def relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """sum |output - target|^2 / sum |target|^2 over every token of the batches."""
    missed = sum(float((out.float() - y.float().view(out.shape)).square().sum()) for out, y in zip(outputs, targets))
    return missed / max(sum(float(y.float().square().sum()) for y in targets), 1e-30)


class LayerErrorLog(Stage):
    """A stage that records each layer's relative output error before and after it, under `record_key`
    in the carve's record, and keeps the log across a resumed carve."""

    record_key = "error"

    def __init__(self):
        self.errors: list[dict] = []

    def log(self, layer: int, before: float, after: float) -> None:
        self.errors.append({"layer": layer, "before": round(before, 6), "after": round(after, 6)})

    def state(self) -> list[dict]:
        return self.errors

    def restore(self, pipeline: Pipeline, state, done: int) -> None:
        self.errors = list(state)

    def report(self) -> dict:
        return {self.record_key: self.errors}


class RefitRouter(LayerErrorLog):
    """After the refit: fit the linear router to pick, on each calibration token, the refitted experts
    that remove the most of the layer's error (see refit_router_scores), then refit the down projections
    for the new routing, pulled towards the carved weights as the first refit was. The layer keeps
    whichever of the two fits has the lower error on its calibration tokens; each routed layer's error
    before and after goes to the carve's record (`router_refit_error`)."""

    name = "refit_router"
    needs = frozenset({CALIBRATION, MLP_IO})
    refusal = "--refit-router fits each carved layer's router on calibration data: drop --profile or --refit-router"
    record_key = "router_refit_error"

    def __init__(self, ridge: float, scale: str, gate_value: float, logit_factor: float):
        super().__init__()
        self.ridge, self.scale = ridge, scale
        self.gate_value, self.logit_factor = gate_value, logit_factor

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        block, targets = work.block, work.fit_targets
        carved, work.carved_down = work.carved_down, None
        if not 0 < block.top_k < block.num_experts:  # no routing choice to improve
            return
        with pipeline.timer.stage(self.name):
            before = relative_error(work.block_outputs, targets)
            changed = [router_projection(block), *down_projections(block)]
            first_fit = [{name: tensor.clone() for name, tensor in module.state_dict().items()} for module in changed]
            refit_router_scores(block, work.inputs, targets, self.gate_value, self.logit_factor)
            with torch.no_grad():  # the second refit pulls towards the carved weights, as the first did
                for down, weight in zip(down_projections(block), carved):
                    down.weight.copy_(weight)
            outputs = refit_down_projections(block, work.inputs, targets, self.ridge, self.scale)
            after = relative_error(outputs, targets)
            if after < before:
                work.block_outputs = outputs
            else:
                for module, state in zip(changed, first_fit):
                    module.load_state_dict(state)
        self.log(work.index, before, after)


class Reconstruct(LayerErrorLog):
    """Train the layer's block for a few steps towards the dense FFN's outputs on its calibration inputs
    (see cmoe.pipeline.reconstruct); each layer's relative output error before and after goes to the
    carve's record."""

    name = "reconstruct"
    needs = frozenset({CALIBRATION, MLP_IO})
    refusal = "--reconstruct-steps fits each carved layer on calibration data: drop --profile or pass 0"
    record_key = "reconstruction_error"

    def __init__(self, options: CarveOptions):
        super().__init__()
        self.options = options

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        options = self.options
        with pipeline.timer.stage(self.name):
            residual = [batch.hidden for batch in pipeline.runner.batches]
            weights = torch.cat(residual_token_weights(options.reconstruct_weighting, residual))
            before, after, outputs = reconstruct_block(
                work.block,
                _token_rows(work.inputs),
                _token_rows(work.fit_targets),
                weights,
                options.reconstruct_parts,
                options.reconstruct_steps,
                options.reconstruct_lr,
                options.reconstruct_tokens,
                layer_seed(options.seed, work.index),
                pipeline.device,
                None if work.block_outputs is None else _token_rows(work.block_outputs),
            )
        pieces = outputs.split([x.shape[:-1].numel() for x in work.inputs])
        work.block_outputs = [piece.view(x.shape) for piece, x in zip(pieces, work.inputs)]
        self.log(work.index, before, after)


SELECTION_SAMPLE_TOKENS = 2048


class AdaptiveBudget(Stage):
    """Measure each block's output error for every number of active experts, then spread the uniform
    budget's total over the layers where it removes the most error."""

    name = "budget"
    needs = frozenset({CALIBRATION, MLP_IO})
    refusal = (
        "--budget adaptive measures each carved layer on calibration data: drop --profile or pass --budget uniform"
    )

    def __init__(self, active: int):
        self.active = active
        self.errors: list[torch.Tensor] = []

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        with pipeline.timer.stage(self.name):
            residual = [batch.hidden for batch in pipeline.runner.batches]
            self.errors.append(
                relative_selection_errors(work.block.to(pipeline.device), work.inputs, work.outputs, residual)
            )

    def state(self) -> list[torch.Tensor]:
        return self.errors

    def restore(self, pipeline: Pipeline, state, done: int) -> None:
        self.errors = list(state)

    def end(self, pipeline: Pipeline) -> None:
        allocation = allocate_active_experts(torch.stack(self.errors), len(pipeline.layers) * self.active)
        for layer, active in zip(pipeline.layers, allocation):
            layer.mlp.top_k = active


SHARED_WIDTHS: Registry[Callable[[CarveOptions, GradientImportance | None], BuildBlock]] = Registry(
    "shared width", "--shared-width"
)
SHARED_WIDTHS.register("uniform", "the shape's shared experts in every layer (reference)", BuildBlock)
SHARED_WIDTHS.register(
    "adaptive",
    "per layer, one shared expert fewer, as many or one more (same active experts per token), by measured error",
    lambda options, gradients: AdaptiveSharedBlock(options),
)

BUDGETS: Registry[Callable[[CarveOptions], list[Stage]]] = Registry("budget", "--budget")
BUDGETS.register("uniform", "N_k active experts in every layer (reference)", lambda options: [])
BUDGETS.register(
    "adaptive",
    "the same total, spread over the layers to minimise measured output error (sequential carving only)",
    lambda options: [AdaptiveBudget(options.shape.active)],
)


def _token_rows(tensors: list[torch.Tensor], stride: int = 1) -> torch.Tensor:
    """Every stride-th token of the batches, as (tokens, features) in fp32."""
    return torch.cat([tensor.reshape(-1, tensor.shape[-1])[::stride].float() for tensor in tensors])


def _sampled_rows(tensors: list[torch.Tensor], limit: int) -> torch.Tensor:
    """Every stride-th token of the batches (at most about `limit`), as (tokens, features) in fp32."""
    total = sum(tensor.shape[:-1].numel() for tensor in tensors)
    return _token_rows(tensors, max(1, -(-total // limit)))


def shared_candidates(shape: MoEShape) -> list[MoEShape]:
    """The shapes --shared-width adaptive tries in a layer: the shape's own first, then one shared expert
    fewer and one more, each with the same number of active experts per token (at least one routed)."""
    counts = [shape.shared, shape.shared - 1, shape.shared + 1]
    return [shared_variant(shape, count) for count in counts if 0 <= count < shape.shared + shape.active]


def shared_variant(shape: MoEShape, shared: int) -> MoEShape:
    """`shape` with `shared` shared experts and the active routed experts that keep its active total."""
    return MoEShape(shared, shape.shared + shape.active - shared, shape.experts).validated()


@torch.no_grad()
def held_out_error(block: nn.Module, x: torch.Tensor, target: torch.Tensor, energy: torch.Tensor) -> float:
    """The block's output error on tokens `x` (T, d), each token's squared error over its residual
    stream's energy `energy` (T, 1), averaged over tokens."""
    dtype = next(block.parameters()).dtype
    missed = (block(x.to(dtype)).float() - target).square().sum(dim=1, keepdim=True)
    return float((missed / energy.clamp_min(1e-12)).mean())


@torch.no_grad()
def relative_selection_errors(block: nn.Module, inputs: list, outputs: list, residual: list) -> torch.Tensor:
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


class CountRouting(Stage):
    """Count, per carved layer, how many tokens its router sends to each expert (forward hooks)."""

    name = "count_routing"
    needs = frozenset({CALIBRATION})

    def __init__(self):
        self.counts: torch.Tensor | None = None
        self._handles: list = []

    def begin(self, pipeline: Pipeline) -> None:
        blocks = moe_blocks(pipeline.model)
        self.counts = torch.zeros(len(blocks), max(block.num_experts for _, block in blocks), dtype=torch.long)
        for position, (_, block) in enumerate(blocks):
            self._handles.append(block.router.register_forward_hook(self._hook(position)))

    def _hook(self, position: int):
        def record(module: nn.Module, args, routing) -> None:
            self.counts[position] += torch.bincount(routing.indices.reshape(-1).cpu(), minlength=self.counts.shape[1])

        return record

    def close(self, pipeline: Pipeline) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class NegativeLogLikelihood(Stage):
    """After the last layer: the summed next-token NLL of every window, and the tokens predicted."""

    name = "nll"
    needs = frozenset({CALIBRATION})

    def __init__(self):
        self.total = 0.0
        self.predicted = 0

    def end(self, pipeline: Pipeline) -> None:
        self.total, self.predicted = pipeline.runner.negative_log_likelihood()

    @property
    def mean(self) -> float:
        return self.total / self.predicted


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, CMoE block) of every carved layer, recognised by its router."""
    return [(index, layer.mlp) for index, layer in enumerate(decoder_of(model).layers) if hasattr(layer.mlp, "router")]


def carve_block(
    dense: nn.Module, stats, options: CarveOptions, hidden_act: str, layer: int, importance: torch.Tensor | None = None
) -> nn.Module:
    """One layer's MoE block: partition by the construction method, checked, then built."""
    method = METHODS.get(options.method)
    partition = method(stats, options, dense=dense, importance=importance, layer=layer)
    check_partition(partition, stats.num_neurons, method.overlapping)
    spec = options.layer_spec(dense.gate_proj.weight.shape[0], layer)
    return build_block(dense, partition, spec, hidden_act, stats, seed=layer_seed(options.seed, layer))


def carve_stages(options: CarveOptions, profile: Path | None = None, batch_size: int = 1) -> list[Stage]:
    """The stages of a carve under `options`: from a saved profile, or measured on calibration data
    (with the gradient pass, the rescaling, the refit and the budget the options ask for)."""
    method = METHODS.get(options.method)
    gradients = None
    if method.needs_gradients:
        gradients = GradientImportance(options.method, options.shape.routed, options.seed, batch_size)
    if profile is not None:
        source: list[Stage] = [SavedStatistics(profile)]
    else:
        source = [Statistics(options.ka, options.statistic, options.needed_statistics())]
    stages = ([gradients] if gradients else []) + source
    builder = SHARED_WIDTHS.get(options.shared_width)(options, gradients)
    drift = []
    if options.refit_drift and (options.refit_down or options.reconstruct_steps):
        drift = [DenseStreamTargets(options.refit_drift)]
    # A block builder that scores candidates needs the targets first; otherwise the statistics (on the
    # compute device, GiBs at 70B's width) are freed by the builder before the dense stream's pass.
    stages += (drift + [builder]) if builder.needs_targets else ([builder] + drift)
    if options.rescale:
        stages.append(Rescale(options.shape.routed / options.shape.active))
    if options.flat_gate:
        stages.append(FlattenGate(options.shape.active))
    if options.refit_down:
        stages.append(
            Refit(
                options.refit_ridge,
                options.refit_ridge_scale,
                keep_carved=options.refit_router,
                weighting=options.refit_weighting,
            )
        )
    if options.refit_router:
        gate_value = 1.0 / options.shape.active if options.flat_gate else 1.0
        logit_factor = FLAT_GATE_FACTOR if options.flat_gate else 1.0
        stages.append(RefitRouter(options.refit_ridge, options.refit_ridge_scale, gate_value, logit_factor))
    if options.reconstruct_steps:
        stages.append(Reconstruct(options))
    return stages + BUDGETS.get(options.budget)(options)


def block_spec(block: CMoEBlock, spec: MoELayerSpec) -> MoELayerSpec:
    """The spec of a carved `block` (the options' `spec` with the block's own widths and top-k)."""
    shared = 0 if block.shared is None else block.shared.gate_proj.weight.shape[0]
    return replace(spec, shared_size=shared, num_experts=block.num_experts, top_k=block.top_k)


def as_carved_model(dense_model: nn.Module, options: CarveOptions) -> CMoEForCausalLM:
    """Wrap the dense model's modules (MLPs already replaced) in the carved architecture, sharing weights."""
    text_config = dense_model.config
    spec = options.layer_spec(text_config.intermediate_size)
    specs = [block_spec(layer.mlp, spec) for layer in decoder_of(dense_model).layers]
    config = CMoEConfig(text_config=text_config.to_dict(), cmoe_layers=specs)
    with torch.device("meta"):
        carved = CMoEForCausalLM(config)
    carved.model = dense_model.model
    carved.lm_head = dense_model.lm_head
    carved.config.text_config._attn_implementation = dense_model.config._attn_implementation
    carved.generation_config = dense_model.generation_config
    return carved.eval()
