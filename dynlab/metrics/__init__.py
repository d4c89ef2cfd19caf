"""Probe metrics: per-token/per-sequence statistics (functional) and torchmetrics accumulators (probe)."""

from dynlab.metrics.functional import (
    MEAN_METRICS,
    SEQUENCE_METRICS,
    SUM_METRICS,
    ANormReduction,
    paper_a_norm,
    sequence_stats,
    token_stats,
)
from dynlab.metrics.probe import PreferenceMetric, ProbeTypeMetric

__all__ = [
    "MEAN_METRICS",
    "SEQUENCE_METRICS",
    "SUM_METRICS",
    "ANormReduction",
    "PreferenceMetric",
    "ProbeTypeMetric",
    "paper_a_norm",
    "sequence_stats",
    "token_stats",
]
