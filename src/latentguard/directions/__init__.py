"""Directions and probes derived from taps: diff-in-means, linear probes, refusal proxy."""

from latentguard.directions.metrics import refusal_metric, refusal_token_ids
from latentguard.directions.probes import ProbeResult, fit_probe
from latentguard.directions.scan import ScanConfig, ScanResult, scan_model

__all__ = [
    "refusal_metric", "refusal_token_ids", "ProbeResult", "fit_probe", "ScanConfig", "ScanResult", "scan_model",
]
