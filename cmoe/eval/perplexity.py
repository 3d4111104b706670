"""`cmoe eval perplexity`: the GPTQ protocol, dense or carved, one layer at a time."""

import time
from dataclasses import dataclass, replace
from pathlib import PurePath

import torch

from cmoe.calibration import open_text, read_evaluation_windows
from cmoe.errors import CmoeError
from cmoe.io.artifacts import versions
from cmoe.io.loading import PreparedModel, check_seqlen, load_layerwise, load_tokenizer, prepare_model
from cmoe.io.model_card import record_results, recording_directory
from cmoe.pipeline.runner import LayerCallback
from cmoe.pipeline.sequential import Pipeline
from cmoe.pipeline.stages import NegativeLogLikelihood
from cmoe.recipes import Compute

PROTOCOL = "GPTQ: text tokenised once, non-overlapping windows, trailing partial window dropped"


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
    recorded_in: str | None = None

    def as_dict(self) -> dict:
        recorded = {"recorded_in": self.recorded_in} if self.recorded_in else {}
        return {
            "perplexity": self.perplexity,
            "mean_nll": self.nll,
            "seqlen": self.seqlen,
            "windows": self.windows,
            "tokens": self.tokens,
            "protocol": PROTOCOL,
            "model": self.model,
            "data": self.data,
            "seconds": round(self.seconds, 3),
            **recorded,
        }


def layerwise_mean_nll(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, device="cpu", on_layer=None, weights=None
) -> float:
    """Mean next-token NLL of a model on token windows (N, seqlen), run layer by layer (its layers read
    one at a time when `weights` holds them)."""
    nll = NegativeLogLikelihood()
    with torch.no_grad():
        Pipeline(model, [nll], windows, batch_size, device, on_layer=on_layer, weights=weights).run()
    return nll.mean


def perplexity_of(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, device="cpu", on_layer=None
) -> float:
    """Perplexity of a loaded model on token windows (N, seqlen), run layer by layer."""
    return _perplexity(layerwise_mean_nll(model, windows, batch_size, device, on_layer))


def _perplexity(mean_nll: float) -> float:
    return float(torch.exp(torch.tensor(mean_nll, dtype=torch.float64)))


def run_perplexity(
    model: str,
    data: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    split: str = "test",
    compute: Compute = Compute(),
    on_layer: LayerCallback | None = None,
    record: bool | None = None,
) -> PerplexityResult:
    """Perplexity with the GPTQ protocol, dense or carved, run one layer at a time; saved into the model's
    recipe and card when `record` (None: when MODEL is a directory cmoe wrote)."""
    started = time.perf_counter()
    if max_windows is not None and max_windows < 1:
        raise CmoeError(f"--max-windows {max_windows}: must be at least 1")
    prepared = prepare_model(model, compute.device, compute.dtype)
    target = recording_directory(prepared.source, record)
    check_seqlen(seqlen, prepared.config)
    tokenizer = load_tokenizer(prepared.source)
    text = open_text(data, split)
    windows, description = read_evaluation_windows(text, tokenizer, seqlen, max_windows)
    loaded, weights = load_layerwise(prepared)
    mean = layerwise_mean_nll(loaded, windows, compute.batch_size, prepared.device, on_layer, weights)
    result = PerplexityResult(
        perplexity=_perplexity(mean),
        nll=mean,
        seqlen=seqlen,
        windows=windows.shape[0],
        tokens=int(windows.numel()),
        model=prepared.source.description,
        data=description,
        seconds=time.perf_counter() - started,
    )
    if target is None:
        return result
    record_results(target, [card_entry(result, prepared, compute.batch_size, max_windows)])
    return replace(result, recorded_in=str(target))


def card_entry(result: PerplexityResult, prepared: PreparedModel, batch_size: int, max_windows: int | None) -> dict:
    """The result as a model-card entry: the evaluation text as its dataset (a hub source by its repository,
    a local file by its name), with the protocol's settings."""
    data = result.data
    if data.get("repo_id"):
        dataset = {
            "name": data["source"],
            "type": data["repo_id"],
            "config": data.get("config"),
            "split": data.get("split"),
            "revision": data.get("commit") or data.get("revision"),
        }
    else:
        dataset = {"name": PurePath(data["path"]).name, "type": data.get("format") or "local"}
    protocol = {
        "protocol": PROTOCOL,
        "seqlen": result.seqlen,
        "windows": result.windows,
        "max_windows": max_windows,
        "tokens": result.tokens,
        "mean_nll": result.nll,
        "batch_size": batch_size,
        "device": str(prepared.device),
        "dtype": str(prepared.dtype).removeprefix("torch."),
        "data": data,
        "versions": versions(),
    }
    return {
        "task": "perplexity",
        "dataset": dataset,
        "metrics": [{"type": "perplexity", "value": result.perplexity, "name": f"perplexity (seqlen {result.seqlen})"}],
        "protocol": protocol,
    }
