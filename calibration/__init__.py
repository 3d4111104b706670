"""Calibration and evaluation text sources."""
