"""`cmoe profile` and `cmoe carve`: validate every input cheaply, run the pipeline, write atomically."""

import shutil
import time
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path

import torch

from cmoe.calibration import STREAM_POOL, TextSource, calibration_windows, check_fits_text, open_text, read_tokens
from cmoe.errors import CmoeError
from cmoe.export.base import CarvedView
from cmoe.export.writer import ExportWriter, WriteExportedLayer
from cmoe.io.artifacts import RESUME_DIR, StageTimer, claimed_output, command_line, versions
from cmoe.io.carved import save_carved
from cmoe.io.lazy import LazyWeights
from cmoe.io.model_card import source_license
from cmoe.io.loading import (
    PreparedModel,
    check_seqlen,
    estimated_weight_bytes,
    load_layerwise,
    load_model,
    load_tokenizer,
    prepare_model,
)
from cmoe.modeling import mean_active_neurons, shared_experts_per_layer
from cmoe.modeling.configuration_cmoe import CMoEConfig
from cmoe.modeling.modeling_cmoe import CMoEForCausalLM
from cmoe.io.recipe_file import recipe_text
from cmoe.io.shards import ShardWriter
from cmoe.methods import METHODS
from cmoe.io.profile_format import FORMAT, ProfileFile, StreamingSafetensorsWriter, profile_bytes_per_layer
from cmoe.numerics.statistics import MARK_STATISTICS, OPTIONAL_STATISTICS, PROFILE_STATISTICS
from cmoe.pipeline.runner import LayerCallback
from cmoe.pipeline.resume import LayerCheckpoints
from cmoe.pipeline.sequential import Pipeline, Stage, check_stages
from cmoe.pipeline.stages import Statistics, WriteCarvedLayer, WriteProfile, as_carved_model, carve_stages
from cmoe.recipes import Calibration, CarveOptions, CarveRecipe, Compute, check_ka


def calibration_tokens(calibration: Calibration, prepared: PreparedModel, timer: StageTimer):
    """(tokenizer, windows, description) of the calibration data, checked against the model first."""
    check_seqlen(calibration.seqlen, prepared.config)
    with timer.stage("calibration_data"):
        tokenizer = load_tokenizer(prepared.source)
        text = open_text(calibration.source, "train", calibration.commit)
        # Only a local text has a sha256 (a hub source is pinned by its commit instead; a recipe written before
        # named sources were streamed holds their file's sha256, which is not comparable and not checked).
        if calibration.sha256 and "sha256" in text.description and text.description["sha256"] != calibration.sha256:
            raise CmoeError(
                f"{calibration.source}: the calibration text changed since the recipe was written (sha256 "
                f"{str(text.description.get('sha256'))[:12]}, recipe {calibration.sha256[:12]}): "
                "pass --data to carve on it anyway"
            )
        needed = calibration.nsamples * calibration.seqlen
        size = _file_bytes(text)
        if size is not None and size > QUICK_TO_TOKENISE_BYTES:
            check_fits_text(calibration.nsamples, calibration.seqlen, size + 2, "bytes")
        stream = read_tokens(text, tokenizer, None if text.read_whole else STREAM_POOL * needed)
        check_fits_text(calibration.nsamples, calibration.seqlen, int(stream.tokens.numel()), "tokens")
        windows = calibration_windows(stream.tokens, calibration.nsamples, calibration.seqlen, calibration.seed)
    description = {
        **stream.description,
        "nsamples": calibration.nsamples,
        "seqlen": calibration.seqlen,
        "seed": calibration.seed,
        "text_tokens": int(stream.tokens.numel()),
        "calibration_tokens": int(windows.numel()),
    }
    return tokenizer, windows, description


# A smaller text is tokenised in well under a second: its size is not checked before (an empty text is
# then named as such, a short one by its token count).
QUICK_TO_TOKENISE_BYTES = 1 << 20


def _file_bytes(text: TextSource) -> int | None:
    """A local file's size: more than its text's UTF-8 bytes, so a bound on its tokens known before reading."""
    path = text.description.get("path")
    return Path(path).stat().st_size if path and Path(path).is_file() else None


def resume_fingerprint(portable: CarveRecipe, prepared: PreparedModel, profile: Path | None) -> dict:
    """What a resumed carve must share with the run it continues: the recipe, the device and dtype it
    resolved to, the versions that compute, and the profile file as it was."""
    found = versions()
    fingerprint = {
        **portable.to_dict(),
        "device": str(prepared.device),
        "dtype": _dtype_name(prepared.dtype),
        "versions": {name: found.get(name) for name in ("cmoe", "torch", "transformers", "pot")},
    }
    if profile is not None:
        stat = profile.stat()
        fingerprint["profile"] = {"bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}
    return fingerprint


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_profile(
    model: str,
    output: Path,
    calibration: Calibration,
    ka: int = 10,
    compute: Compute = Compute(),
    overwrite: bool = False,
    on_layer: LayerCallback | None = None,
    statistic: str = "normalized",
    gram: bool = False,
) -> dict:
    """Write a profile of the dense model per layer: mark counts, rates and co-activation of the
    `statistic`'s top-K_a marks, plus the optional statistics of the quality options (the d_h x d_h
    contribution Gram of `--grouping kmeans` only with `gram`)."""
    timer = StageTimer()
    with claimed_output(output, overwrite) as slot:
        MARK_STATISTICS.check(statistic)
        prepared = prepare_model(model, compute.device, compute.dtype, kind="dense")
        check_ka(ka, prepared.config.intermediate_size)
        config = prepared.config
        extras = OPTIONAL_STATISTICS if gram else PROFILE_STATISTICS
        slot.require_space(
            config.num_hidden_layers * profile_bytes_per_layer(config.intermediate_size, config.hidden_size, extras)
        )
        _, windows, description = calibration_tokens(calibration, prepared, timer)
        torch.manual_seed(calibration.seed)
        with timer.stage("load_model"):
            dense, weights = load_layerwise(prepared)
        recipe = {
            "tool": "cmoe profile",
            "source_model": prepared.source.description,
            "num_layers": dense.config.num_hidden_layers,
            "intermediate_size": dense.config.intermediate_size,
            "ka": ka,
            "statistic": statistic,
            "statistics": ["counts", "rates", "coactivation", *extras],
            "calibration": description,
            "device": str(prepared.device),
            "dtype": _dtype_name(prepared.dtype),
            "command": command_line(),
            "versions": versions(),
        }
        with slot.staged() as staging:
            writer = StreamingSafetensorsWriter(slot.scratch)
            stages = [Statistics(ka, statistic, extras), WriteProfile(writer)]
            with timer.stage("profile"):
                Pipeline(
                    dense,
                    stages,
                    windows,
                    compute.batch_size,
                    prepared.device,
                    "dense",
                    StageTimer(),
                    on_layer,
                    weights,
                ).run()
            recipe["timings_s"] = timer.rounded()
            writer.finish(staging, {"format": FORMAT, "recipe": recipe_text(recipe)})
        return recipe


def run_carve(
    model: str,
    output: Path,
    options: CarveOptions,
    calibration: Calibration | None,
    profile: Path | None = None,
    compute: Compute = Compute(),
    overwrite: bool = False,
    on_layer: LayerCallback | None = None,
    resume: bool = False,
) -> dict:
    """Carve the dense model into an MoE and save it atomically with its recipe and model card."""
    recipe = CarveRecipe(model, options, calibration, None if profile is None else str(profile), compute)
    return carve(recipe, output, overwrite, on_layer, resume)


def carve(
    recipe: CarveRecipe,
    output: Path,
    overwrite: bool = False,
    on_layer: LayerCallback | None = None,
    resume: bool = False,
) -> dict:
    """Carve as `recipe` says; the returned record (also written to the artifact) holds the replayable
    recipe under `recipe`, with the model, calibration text and profile as absolute paths. Each finished
    layer is written at once with the state the next needs, so a killed carve continues with `resume`."""
    timer = StageTimer()
    started = time.perf_counter()
    options, compute = recipe.options, recipe.compute
    if resume and recipe.export_format is not None:
        raise CmoeError("--resume continues cmoe-format carves; a --format carve keeps no state to resume from")
    with claimed_output(output, overwrite, resume=resume) as slot:
        profile = None if recipe.profile is None else Path(recipe.profile)
        check_stages(carve_stages(options, profile, compute.batch_size), has_calibration=recipe.calibration is not None)
        prepared = prepare_model(recipe.model, compute.device, compute.dtype, kind="dense")
        dense_config = prepared.config
        options.check(dense_config.intermediate_size, dense_config.num_hidden_layers)
        slot.require_space(int(1.05 * estimated_weight_bytes(dense_config, prepared.dtype)))
        portable = recipe.with_overrides(
            model=prepared.source.description, profile=str(profile.resolve()) if profile else None
        )
        record = carve_record(options, source_model=prepared.source.description, command=command_line())
        record.update(device=str(prepared.device), dtype=_dtype_name(prepared.dtype))
        license_fields = source_license(prepared.source.description)
        if license_fields:
            record["source_license"] = license_fields
        if dense_config.intermediate_size % options.shape.experts:
            record["leftover_neurons_in_shared"] = dense_config.intermediate_size % options.shape.experts
        windows = None
        if profile is not None:
            saved = ProfileFile(profile)
            saved.check_matches(dense_config.num_hidden_layers, dense_config.intermediate_size)
            saved.check_serves(options.statistic, options.ka, options.needed_statistics())
            tokenizer = load_tokenizer(prepared.source)
            record.update(
                mode="from-profile (dense statistics)", profile=str(profile), calibration=saved.recipe["calibration"]
            )
        else:
            tokenizer, windows, description = calibration_tokens(recipe.calibration, prepared, timer)
            portable = portable.with_overrides(
                calibration=replace(
                    recipe.calibration.portable(), sha256=description.get("sha256"), commit=description.get("commit")
                )
            )
            mode = "sequential (each layer profiled on carved upstream layers)"
            if options.propagate == "dense":
                mode = "sequential on dense upstream layers (each layer profiled on the dense model's outputs)"
            record.update(mode=mode, calibration=description)
            record.update(
                nsamples=recipe.calibration.nsamples, seqlen=recipe.calibration.seqlen, seed=recipe.calibration.seed
            )
        with slot.staged() as staging:
            staging.mkdir(exist_ok=True)
            weights, checkpoints = None, None
            native = recipe.export_format is None
            with timer.stage("load_model"):
                if not METHODS.get(options.method).needs_gradients:
                    dense, weights = load_layerwise(prepared)
                else:
                    dense = load_model(prepared.source, prepared.dtype)
            if native:
                writer = ShardWriter(staging, dense_config.num_hidden_layers + 1)
                extra = [WriteCarvedLayer(writer)]
                checkpoints = LayerCheckpoints(staging / RESUME_DIR, resume_fingerprint(portable, prepared, profile))
            else:
                writer = ExportWriter(planned_view(dense, options, recipe.export_format), staging)
                extra = [WriteExportedLayer(writer)]
            record["loading"] = "per layer (lazy)" if weights is not None else "whole model"
            try:
                carved = carve_model(
                    dense,
                    windows,
                    options,
                    compute.batch_size,
                    prepared.device,
                    timer,
                    on_layer,
                    profile,
                    extra,
                    weights,
                    checkpoints,
                    record,
                )
                record["active_experts_per_layer"] = [spec.top_k for spec in carved.config.layer_specs]
                record["shared_experts_per_layer"] = shared_experts_per_layer(carved.config, options.shape.experts)
                record["mean_active_ffn_neurons"] = mean_active_neurons(carved.config)
                record["recipe"] = portable.to_dict()
                with timer.stage("save"):
                    record["timings_s"] = timer.rounded()
                    record["timings_s"]["total"] = round(time.perf_counter() - started, 3)
                    if native:
                        save_carved(carved, tokenizer, staging, record, writer)
                    else:
                        writer.finish(tokenizer, carved.generation_config, record)
                if checkpoints is not None and checkpoints.directory.exists():
                    shutil.rmtree(checkpoints.directory)
            except BaseException:
                done = checkpoints.done() if checkpoints is not None else 0
                if done:
                    slot.keep_for_resume(f"{done} of {dense_config.num_hidden_layers} layers carved")
                raise
        return record


@torch.no_grad()
def carve_model(
    model: torch.nn.Module,
    windows: torch.Tensor | None,
    options: CarveOptions,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    timer: StageTimer | None = None,
    on_layer: LayerCallback | None = None,
    profile: Path | None = None,
    extra_stages: Sequence[Stage] = (),
    weights: LazyWeights | None = None,
    checkpoints: LayerCheckpoints | None = None,
    record: dict | None = None,
) -> CMoEForCausalLM:
    """Carve a loaded dense model in place (its MLPs become MoE blocks) on calibration `windows`, or from
    a saved `profile` (windows None), and return it wrapped in the carved architecture. `extra_stages`
    run after the carve's own stages, on every layer (e.g. to measure each block before propagation, or to
    write it out); with lazy `weights` each layer is read before its pass and released once final; with
    `checkpoints` the state after each layer is saved, and a saved state is resumed; `record` receives
    what the stages measured (e.g. each layer's reconstruction error)."""
    stages = carve_stages(options, profile, batch_size) + list(extra_stages)
    Pipeline(model, stages, windows, batch_size, device, options.propagate, timer, on_layer, weights, checkpoints).run()
    if record is not None:
        for stage in stages:
            record.update(stage.report())
    return as_carved_model(model, options)


def planned_view(dense: torch.nn.Module, options: CarveOptions, fmt: str) -> CarvedView:
    """The export view of the carve of `dense` before any block is built: a `--format` carve has one spec
    for every layer (its options are checked for a uniform budget), so the config the carved model will
    have is known up front, and each layer is exported as soon as the pipeline makes it final."""
    text_config = dense.config
    spec = options.layer_spec(text_config.intermediate_size)
    config = CMoEConfig(text_config=text_config.to_dict(), cmoe_layers=[spec] * text_config.num_hidden_layers)
    return CarvedView.of(dense, fmt, config)


def carve_record(options: CarveOptions, **extra) -> dict:
    """The human-readable part of a carve's record: the shape, the resolved options, the versions."""
    return {
        "tool": "cmoe carve",
        "config": options.shape.name,
        "shared_experts": options.shape.shared,
        "active_experts": options.shape.active,
        "experts": options.shape.experts,
        "active_fraction": options.shape.active_fraction,
        **{name: value for name, value in options.to_dict().items() if name != "config"},
        "versions": versions(),
        **extra,
    }
