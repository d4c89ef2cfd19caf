"""The learning-dynamics decomposition itself: first-order influence of an update, eNTK terms (A, K, G),
gradient similarity between responses, the squeezing toy and the digits example."""

from dynlab.dynamics.callback import DynamicsCallback

__all__ = ["DynamicsCallback"]
