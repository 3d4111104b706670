"""Training and evaluation text of `cmoe finetune`: the tokenised domains and the windows drawn from them.

Every training window is a pure function of (seed, sample index, mixture weights), so a resumed or
multi-process run draws exactly the windows an uninterrupted single-process one does.
"""

from dataclasses import dataclass

import torch

from cmoe.calibration import STREAM_POOL, open_text, read_evaluation_windows, stream_tokens
from cmoe.errors import CmoeError
from cmoe.finetune.recipe import DataSpec, FinetuneOptions
from cmoe.numerics.mixture import draw_sample
from cmoe.numerics.training import sample_position

PROBE_WINDOWS = 8


@dataclass
class Domain:
    """One `--data` source, tokenised once; `heldout` (dynamic mixtures only) are its last windows, kept out
    of training to measure the domain's loss."""

    spec: DataSpec
    description: dict
    train_tokens: torch.Tensor
    heldout: torch.Tensor | None


def load_domain(spec: DataSpec, tokenizer, seqlen: int, heldout_windows: int, nsamples: int) -> Domain:
    """The source's tokens, streamed (a hub dataset only as far as a pool of `nsamples` windows reaches)."""
    reserved = heldout_windows * seqlen
    text = open_text(spec.source, "train")
    stream = stream_tokens(text, tokenizer, None if text.read_whole else STREAM_POOL * nsamples * seqlen + reserved)
    tokens = stream.tokens
    if tokens.numel() < seqlen + reserved:
        what = f"one window of {seqlen}" + (f" plus {reserved} held-out tokens" if reserved else "")
        raise CmoeError(
            f"{spec.source}: {tokens.numel()} tokens, fewer than {what}: use a longer text or a smaller --seqlen"
        )
    train_tokens = tokens[: tokens.numel() - reserved] if reserved else tokens
    heldout = tokens[-reserved:].reshape(-1, seqlen) if reserved else None
    description = {
        **stream.description,
        "weight": spec.weight,
        "tokens": int(tokens.numel()),
        "train_tokens": int(train_tokens.numel()),
    }
    return Domain(spec, description, train_tokens, heldout)


@dataclass
class TrainingData:
    """The domains of a run and the sampling parameters every window draw reads."""

    domains: list[Domain]
    seed: int
    nsamples: int
    seqlen: int

    def windows(self, weights: list[float], first: int, count: int) -> torch.Tensor:
        """Training samples `first` .. `first + count - 1` under the mixture `weights`, as (count, seqlen)."""
        lengths = [domain.train_tokens.numel() for domain in self.domains]
        windows = []
        for index in range(first, first + count):
            position = sample_position(self.seed, index, self.nsamples)
            domain, start = draw_sample(self.seed, position, weights, lengths, self.seqlen)
            windows.append(self.domains[domain].train_tokens[start : start + self.seqlen])
        return torch.stack(windows)

    def probe_windows(self, weights: list[float]) -> torch.Tensor:
        """The windows the routing load is measured on before and after training: the first training draws."""
        return self.windows(weights, 0, min(PROBE_WINDOWS, self.nsamples))


def load_training_data(specs: tuple[DataSpec, ...], tokenizer, options: FinetuneOptions) -> TrainingData:
    """Every `--data` source tokenised; a re-weighting mixture holds out --heldout-windows of each."""
    heldout_windows = options.heldout_windows if options.reweights_mixture else 0
    domains = [load_domain(spec, tokenizer, options.seqlen, heldout_windows, options.nsamples) for spec in specs]
    return TrainingData(domains, options.seed, options.nsamples, options.seqlen)


@dataclass(frozen=True)
class EvalData:
    """Held-out text for perplexity during training: its first windows (GPTQ protocol) and where it came from."""

    windows: torch.Tensor
    description: dict


def load_eval_data(source: str, tokenizer, seqlen: int, max_windows: int) -> EvalData:
    windows, description = read_evaluation_windows(open_text(source, "test"), tokenizer, seqlen, max_windows)
    return EvalData(windows, {**description, "windows": windows.shape[0], "seqlen": seqlen})
