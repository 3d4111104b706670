"""Calibration and evaluation text (installed as `cmoe.calibration`): loading, tokenising, windowing."""

from .sources import NAMED_SOURCES, SPLITS, HubSource, LoadedText, load_text
from .windows import calibration_windows, check_fits_text, evaluation_windows, tokenize_text

__all__ = [
    "NAMED_SOURCES",
    "SPLITS",
    "HubSource",
    "LoadedText",
    "calibration_windows",
    "check_fits_text",
    "evaluation_windows",
    "load_text",
    "tokenize_text",
]
