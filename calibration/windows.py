"""Token streams and the windows cut from them: seeded random for calibration, consecutive for evaluation."""

import random
from dataclasses import dataclass

import torch

from cmoe.errors import CmoeError

from .formats import read_documents
from .sources import TextSource

# A bounded read stops this many tokens past what the windows need, so that the tokens they use are the
# ones the whole text gives (only the last few tokens of a cut text can differ).
CUT_MARGIN_TOKENS = 64
# Characters read per token needed, before the first tokenisation of a bounded read (doubled when short).
CHARACTERS_PER_TOKEN = 4
# A streamed dataset (read_whole False) is read for this many times the tokens its windows need, so that
# seeded windows are drawn from a pool rather than from the first documents only.
STREAM_POOL = 8
# Training text is tokenised in pieces of about this many characters (whole documents), never as one string.
TRAINING_PIECE_CHARACTERS = 1 << 20


@dataclass(frozen=True)
class TokenStream:
    """The tokens read from a source and what they are (the source's description, plus what was read)."""

    tokens: torch.Tensor
    description: dict


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


def read_tokens(source: TextSource, tokenizer, min_tokens: int | None = None) -> TokenStream:
    """The source's text tokenised once (GPTQ): all of it, or with `min_tokens` only its first documents,
    as many as give that many tokens (and a margin), so that a streamed dataset is read no further."""
    documents = _documents(source)
    read: list[str] = []
    target = None if min_tokens is None else CHARACTERS_PER_TOKEN * (min_tokens + CUT_MARGIN_TOKENS)
    while True:
        exhausted = _read_until(documents, read, target)
        text = source.separator.join(read)
        if not text.strip():
            if exhausted:
                raise CmoeError(f"{source.name}: the text is empty (nothing but whitespace)")
            target *= 2
            continue
        tokens = tokenize_text(text, tokenizer)
        if exhausted or tokens.numel() >= min_tokens + CUT_MARGIN_TOKENS:
            break
        target *= 2
    return TokenStream(tokens, _described(source, len(read), len(text), tokens, exhausted))


def stream_tokens(source: TextSource, tokenizer, min_tokens: int | None = None) -> TokenStream:
    """Training text: tokenised in pieces of whole documents (the first piece with the tokenizer's special
    tokens, as a whole text would be), joined as tokens, never as one string; `min_tokens` stops the read."""
    documents = _documents(source)
    pieces, count, characters, total = [], 0, 0, 0
    exhausted = False
    while not exhausted and (min_tokens is None or total < min_tokens):
        piece: list[str] = []
        exhausted = _read_until(documents, piece, TRAINING_PIECE_CHARACTERS)
        if not piece:
            break
        text = (source.separator if pieces else "") + source.separator.join(piece)
        ids = tokenizer(text, add_special_tokens=not pieces, verbose=False).input_ids
        pieces.append(torch.tensor(ids, dtype=torch.long))
        count, characters, total = count + len(piece), characters + len(text), total + len(ids)
    if not total or not any(piece.numel() for piece in pieces):
        raise CmoeError(f"{source.name}: the text is empty (nothing but whitespace)")
    tokens = torch.cat(pieces)
    return TokenStream(tokens, _described(source, count, characters, tokens, exhausted))


def read_evaluation_windows(
    source: TextSource, tokenizer, seqlen: int, max_windows: int | None = None
) -> tuple[torch.Tensor, dict]:
    """GPTQ's windows of a source, read only as far as they reach: `max_windows` (default the source's
    own, e.g. C4's 256 or a streamed dataset's), else the whole text."""
    if max_windows is None:
        max_windows = source.default_max_windows
    stream = read_tokens(source, tokenizer, None if max_windows is None else max_windows * seqlen)
    windows = evaluation_windows(stream.tokens, seqlen, max_windows)
    return windows, stream.description


def _documents(source: TextSource):
    """The source's first `max_documents` documents, read as taken, a failure as one CmoeError naming it."""
    return read_documents(source.name, lambda _: source.documents(), source.max_documents, lazy=True)


def _read_until(documents, read: list[str], characters: int | None) -> bool:
    """Append documents to `read` until their characters reach `characters` (all when None); whether the
    source ran out."""
    size = sum(len(document) for document in read)
    for document in documents:
        read.append(document)
        size += len(document)
        if characters is not None and size >= characters:
            return False
    return True


def _described(source: TextSource, documents: int, characters: int, tokens: torch.Tensor, whole: bool) -> dict:
    return {
        **source.description,
        "documents": documents,
        "characters": characters,
        "read": "whole" if whole else "first documents, as many as the windows need",
        "tokens": int(tokens.numel()),
    }
