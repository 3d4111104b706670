"""`cmoe eval perplexity`: the GPTQ protocol, dense or carved, one layer at a time."""

import time
from dataclasses import dataclass

import torch

from cmoe.calibration import evaluation_windows, load_text, tokenize_text
from cmoe.errors import CmoeError
from cmoe.io.loading import check_seqlen, load_layerwise, load_tokenizer, prepare_model
from cmoe.pipeline.runner import LayerCallback
from cmoe.pipeline.sequential import Pipeline
from cmoe.pipeline.stages import NegativeLogLikelihood
from cmoe.recipes import Compute


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
) -> PerplexityResult:
    """Perplexity with the GPTQ protocol, dense or carved, run one layer at a time."""
    started = time.perf_counter()
    if max_windows is not None and max_windows < 1:
        raise CmoeError(f"--max-windows {max_windows}: must be at least 1")
    prepared = prepare_model(model, compute.device, compute.dtype)
    check_seqlen(seqlen, prepared.config)
    tokenizer = load_tokenizer(prepared.source)
    text = load_text(data, split=split)
    tokens = tokenize_text(text.text, tokenizer)
    if max_windows is None:
        max_windows = text.description.get("default_max_windows")
    windows = evaluation_windows(tokens, seqlen, max_windows)
    loaded, weights = load_layerwise(prepared)
    mean = layerwise_mean_nll(loaded, windows, compute.batch_size, prepared.device, on_layer, weights)
    return PerplexityResult(
        perplexity=_perplexity(mean),
        nll=mean,
        seqlen=seqlen,
        windows=windows.shape[0],
        tokens=int(windows.numel()),
        model=prepared.source.description,
        data=text.description,
        seconds=time.perf_counter() - started,
    )
