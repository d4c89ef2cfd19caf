"""Losses and log-probability helpers: pure tensor maths on flattened response tokens, no Lightning."""

from dynlab.losses.dpo import LOSS_TYPES, DPOArgumentError, LossType, check_dpo_args, dpo_loss
from dynlab.losses.logps import IGNORE_INDEX, response_positions, segment_mean, segment_sum, token_logps
from dynlab.losses.sft import sft_loss

__all__ = [
    "IGNORE_INDEX",
    "LOSS_TYPES",
    "DPOArgumentError",
    "LossType",
    "check_dpo_args",
    "dpo_loss",
    "response_positions",
    "segment_mean",
    "segment_sum",
    "sft_loss",
    "token_logps",
]
