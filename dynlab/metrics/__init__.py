"""Probe metrics: per-token/per-sequence statistics (functional) and torchmetrics accumulators (probe)."""

from dynlab.metrics.displacement import ENTANGLEMENT_STATS, EntanglementMetric
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
    "ENTANGLEMENT_STATS",
    "MEAN_METRICS",
    "SEQUENCE_METRICS",
    "SUM_METRICS",
    "ANormReduction",
    "EntanglementMetric",
    "PreferenceMetric",
    "ProbeTypeMetric",
    "paper_a_norm",
    "sequence_stats",
    "token_stats",
]
