"""Token streams and the windows cut from them: seeded random for calibration, consecutive for evaluation."""

import random

import torch

from cmoe.errors import CmoeError


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """The whole text tokenised once, as GPTQ does (default special tokens), as a 1-D LongTensor.

    `verbose=False` silences the "longer than the specified maximum sequence length" warning: the stream is
    cut into windows afterwards, so its length is expected to exceed the model's.
    """
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids.to(torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at uniform random starts, reproducible from `seed` alone.

    A local RNG keeps the windows independent of (and from disturbing) the global random state.
    """
    if nsamples < 1 or seqlen < 1:
        raise CmoeError(
            f"calibration needs at least one window of at least one token (nsamples {nsamples}, seqlen {seqlen})"
        )
    total = _length(tokens)
    if total < seqlen:
        raise CmoeError(
            f"the calibration text has {total} tokens, fewer than one window of {seqlen}: "
            f"use a text of at least {seqlen} tokens or a smaller --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seqlen) for _ in range(nsamples)]
    return torch.stack([tokens[start : start + seqlen] for start in starts])


def check_fits_text(nsamples: int, seqlen: int, available: int, unit: str) -> None:
    """A command's calibration never asks for more tokens than its text holds (windows may overlap, but a
    larger request is a mistake, and would take minutes to cut): checked on UTF-8 bytes before
    tokenising (a token spans at least one byte, besides a few special ones), then on the tokens."""
    if nsamples * seqlen > available:
        raise CmoeError(
            f"--nsamples {nsamples} x --seqlen {seqlen} = {nsamples * seqlen} tokens, more than the calibration "
            f"text's {available} {unit}: use fewer or shorter windows, or a longer text"
        )


def evaluation_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """GPTQ's perplexity protocol: consecutive non-overlapping windows from the start, the partial tail dropped."""
    if seqlen < 1 or (max_windows is not None and max_windows < 1):
        raise CmoeError(
            f"evaluation needs at least one window of at least one token (seqlen {seqlen}, max windows {max_windows})"
        )
    total = _length(tokens)
    count = total // seqlen
    if count == 0:
        raise CmoeError(
            f"the evaluation text has {total} tokens, fewer than one window of {seqlen}: "
            "use a longer text or a smaller --seqlen"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return tokens[: count * seqlen].reshape(count, seqlen)


def _length(tokens: torch.Tensor) -> int:
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    return tokens.numel()
