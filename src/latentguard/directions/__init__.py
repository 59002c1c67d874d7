"""Directions and probes derived from taps: diff-in-means, linear probes, refusal proxy."""

from latentguard.directions.metrics import refusal_metric, refusal_token_ids
from latentguard.directions.probes import ProbeResult, fit_probe
from latentguard.directions.scan import ScanConfig, ScanResult, scan_model

__all__ = [
    "ProbeResult",
    "ScanConfig",
    "ScanResult",
    "fit_probe",
    "refusal_metric",
    "refusal_token_ids",
    "scan_model",
]
