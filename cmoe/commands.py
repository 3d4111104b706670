"""The library behind each CLI command: validate every input cheaply, then do the heavy work."""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from cmoe.artifacts import StageTimer, atomic_output, check_output_path, command_line, versions
from cmoe.calibration import calibration_windows, evaluation_windows, load_text, tokenize_text
from cmoe.carved_io import mean_active_neurons, save_carved
from cmoe.carving import carve_from_profile, carve_recipe, carve_sequential, profile_metadata, profile_model
from cmoe.errors import CmoeError
from cmoe.loading import (
    ModelSource,
    check_dense_gated,
    is_carved,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_source,
    text_config_of,
)
from cmoe.options import CarveOptions, check_ka
from cmoe.profile_io import ProfileFile, StreamingSafetensorsWriter
from cmoe.runner import LayerCallback, LayerRunner
from cmoe.statistics import MARK_STATISTICS, OPTIONAL_STATISTICS


@dataclass(frozen=True)
class Compute:
    """Where and how to run: device, dtype name, window batch size."""

    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1


@dataclass(frozen=True)
class Calibration:
    source: str
    nsamples: int = 8
    seqlen: int = 2048
    seed: int = 0


@dataclass
class _Prepared:
    source: ModelSource
    config: PreTrainedConfig
    device: torch.device
    dtype: torch.dtype


def _prepare_model(model: str, compute: Compute, dense_only: bool) -> _Prepared:
    if compute.batch_size < 1:
        raise CmoeError(f"--batch-size {compute.batch_size}: must be at least 1")
    source = resolve_source(model)
    config = load_config(source)
    if dense_only and is_carved(config):
        raise CmoeError(f"{model}: already a carved model; pass the dense model")
    if not is_carved(config):
        check_dense_gated(config, source.description)
    device = resolve_device(compute.device)
    return _Prepared(source, config, device, resolve_dtype(compute.dtype, device, config))


def _check_seqlen(seqlen: int, config: PreTrainedConfig) -> None:
    limit = getattr(text_config_of(config), "max_position_embeddings", None)
    if seqlen < 2:
        raise CmoeError(f"--seqlen {seqlen}: must be at least 2")
    if limit and seqlen > limit:
        raise CmoeError(f"--seqlen {seqlen}: above the model's maximum of {limit} positions")


def _calibration_tokens(calibration: Calibration, prepared: _Prepared, timer: StageTimer):
    if calibration.nsamples < 1:
        raise CmoeError(f"--nsamples {calibration.nsamples}: must be at least 1")
    _check_seqlen(calibration.seqlen, prepared.config)
    with timer.stage("calibration_data"):
        tokenizer = load_tokenizer(prepared.source)
        text = load_text(calibration.source, split="train")
        tokens = tokenize_text(text.text, tokenizer)
        windows = calibration_windows(tokens, calibration.nsamples, calibration.seqlen, calibration.seed)
    description = {
        **text.description,
        "nsamples": calibration.nsamples,
        "seqlen": calibration.seqlen,
        "seed": calibration.seed,
        "text_tokens": int(tokens.numel()),
        "calibration_tokens": int(windows.numel()),
    }
    return tokenizer, windows, description


def run_profile(
    model: str,
    output: Path,
    calibration: Calibration,
    ka: int = 10,
    compute: Compute = Compute(),
    overwrite: bool = False,
    on_layer: LayerCallback | None = None,
    statistic: str = "normalized",
) -> dict:
    """Write a profile of the dense model per layer: mark counts, rates and co-activation of the
    `statistic`'s top-K_a marks, plus every optional statistic of the quality options."""
    timer = StageTimer()
    check_output_path(output, overwrite)
    prepared = _prepare_model(model, compute, dense_only=True)
    check_ka(ka, prepared.config.intermediate_size)
    if statistic not in MARK_STATISTICS:
        raise CmoeError(f"--statistic {statistic}: expected one of {', '.join(MARK_STATISTICS)}")
    _, windows, description = _calibration_tokens(calibration, prepared, timer)
    torch.manual_seed(calibration.seed)
    with timer.stage("load_model"):
        dense = load_model(prepared.source, prepared.dtype)
    recipe = {
        "tool": "cmoe profile",
        "source_model": prepared.source.description,
        "num_layers": dense.config.num_hidden_layers,
        "intermediate_size": dense.config.intermediate_size,
        "ka": ka,
        "statistic": statistic,
        "statistics": ["counts", "rates", "coactivation", *OPTIONAL_STATISTICS],
        "calibration": description,
        "device": str(prepared.device),
        "dtype": str(prepared.dtype).removeprefix("torch."),
        "command": command_line(),
        "versions": versions(),
    }
    with atomic_output(output, overwrite) as staging:
        writer = StreamingSafetensorsWriter(staging.parent)
        with timer.stage("profile"):
            profile_model(dense, windows, ka, compute.batch_size, prepared.device, writer, on_layer, statistic)
        recipe["timings_s"] = timer.rounded()
        writer.finish(staging, profile_metadata(recipe))
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
) -> dict:
    """Carve the dense model into an MoE and save it atomically with its recipe and model card."""
    timer = StageTimer()
    started = time.perf_counter()
    check_output_path(output, overwrite)
    if profile is not None:
        options.check_from_profile()
    prepared = _prepare_model(model, compute, dense_only=True)
    dense_config = prepared.config
    options.check(dense_config.intermediate_size)
    recipe = carve_recipe(options, source_model=prepared.source.description, command=command_line())
    recipe.update(device=str(prepared.device), dtype=str(prepared.dtype).removeprefix("torch."))
    if dense_config.intermediate_size % options.shape.experts:
        recipe["leftover_neurons_in_shared"] = dense_config.intermediate_size % options.shape.experts
    if profile is not None:
        saved = ProfileFile(profile)
        saved.check_matches(dense_config.num_hidden_layers, dense_config.intermediate_size)
        saved.check_serves(options.statistic, options.ka, options.needed_statistics())
        tokenizer = load_tokenizer(prepared.source)
        recipe.update(mode="from-profile (dense statistics)", profile=str(profile), calibration=saved.recipe["calibration"])
    else:
        if calibration is None:
            raise CmoeError("carving needs calibration data (--data) or a profile (--profile)")
        tokenizer, windows, description = _calibration_tokens(calibration, prepared, timer)
        recipe.update(mode="sequential (each layer profiled on carved upstream layers)", calibration=description)
        recipe.update(nsamples=calibration.nsamples, seqlen=calibration.seqlen, seed=calibration.seed)
    with timer.stage("load_model"):
        dense = load_model(prepared.source, prepared.dtype)
    with torch.no_grad():
        if profile is not None:
            carved = carve_from_profile(dense, saved, options, timer, on_layer)
        else:
            carved = carve_sequential(dense, windows, options, compute.batch_size, prepared.device, timer, on_layer)
    recipe["active_experts_per_layer"] = [spec["top_k"] for spec in carved.config.cmoe_layers]
    recipe["mean_active_ffn_neurons"] = mean_active_neurons(carved.config)
    with atomic_output(output, overwrite) as staging:
        with timer.stage("save"):
            recipe["timings_s"] = timer.rounded()
            recipe["timings_s"]["total"] = round(time.perf_counter() - started, 3)
            save_carved(carved, tokenizer, staging, recipe)
    return recipe


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    seqlen: int
    windows: int
    tokens: int
    model: str
    data: dict
    seconds: float

    def as_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "mean_nll": self.nll,
            "seqlen": self.seqlen,
            "windows": self.windows,
            "tokens": self.tokens,
            "protocol": "GPTQ: text tokenised once, non-overlapping windows, trailing partial window dropped",
            "model": self.model,
            "data": self.data,
            "seconds": round(self.seconds, 3),
        }


def run_perplexity(
    model: str,
    data: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    split: str = "test",
    compute: Compute = Compute(),
    on_layer: LayerCallback | None = None,
) -> PerplexityResult:
    """Perplexity with the GPTQ protocol, dense or carved, run one layer at a time."""
    started = time.perf_counter()
    if max_windows is not None and max_windows < 1:
        raise CmoeError(f"--max-windows {max_windows}: must be at least 1")
    prepared = _prepare_model(model, compute, dense_only=False)
    _check_seqlen(seqlen, prepared.config)
    tokenizer = load_tokenizer(prepared.source)
    text = load_text(data, split=split)
    tokens = tokenize_text(text.text, tokenizer)
    if max_windows is None:
        max_windows = text.description.get("default_max_windows")
    windows = evaluation_windows(tokens, seqlen, max_windows)
    loaded = load_model(prepared.source, prepared.dtype)
    runner = LayerRunner(loaded, windows, compute.batch_size, prepared.device)
    runner.capture()
    runner.run_all(on_layer)
    total, predicted = runner.negative_log_likelihood()
    mean = total / predicted
    return PerplexityResult(
        perplexity=float(torch.exp(torch.tensor(mean, dtype=torch.float64))),
        nll=mean,
        seqlen=seqlen,
        windows=windows.shape[0],
        tokens=int(windows.numel()),
        model=prepared.source.description,
        data=text.description,
        seconds=time.perf_counter() - started,
    )
