"""Calibration and evaluation text (installed as `cmoe.calibration`): loading, tokenising, windowing."""

from .sources import NAMED_SOURCES, SPLITS, HubSource, LoadedText, TextSource, load_text, open_text
from .windows import (
    STREAM_POOL,
    TokenStream,
    calibration_windows,
    check_fits_text,
    evaluation_windows,
    read_evaluation_windows,
    read_tokens,
    stream_tokens,
    tokenize_text,
)

__all__ = [
    "STREAM_POOL",
    "NAMED_SOURCES",
    "SPLITS",
    "HubSource",
    "LoadedText",
    "TextSource",
    "TokenStream",
    "calibration_windows",
    "check_fits_text",
    "evaluation_windows",
    "load_text",
    "open_text",
    "read_evaluation_windows",
    "read_tokens",
    "stream_tokens",
    "tokenize_text",
]
