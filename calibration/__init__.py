"""Calibration and evaluation text sources (installed as `cmoe.calibration`)."""

from cmoe.calibration.sources import (
    NAMED_SOURCES,
    LoadedText,
    calibration_windows,
    evaluation_windows,
    load_text,
    tokenize_text,
)

__all__ = ["NAMED_SOURCES", "LoadedText", "calibration_windows", "evaluation_windows", "load_text", "tokenize_text"]
