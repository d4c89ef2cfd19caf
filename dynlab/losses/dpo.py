"""Direct preference losses (DPO / cDPO, IPO, hinge) on summed response log-probabilities."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor

LossType = Literal["sigmoid", "ipo", "hinge"]


class DPOArgumentError(ValueError):
    """A bad :func:`dpo_loss` argument; ``argument`` names it (``beta``, ``label_smoothing`` or ``loss_type``)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument} {message}")
        self.argument, self.message = argument, message


def check_dpo_args(beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> None:
    """Raise :class:`DPOArgumentError` unless ``beta`` is finite and > 0, ``label_smoothing`` is in [0, 0.5) and
    only set with the ``sigmoid`` loss, and ``loss_type`` is one of :data:`LossType`."""
    if not 0 < beta < math.inf:
        raise DPOArgumentError("beta", f"must be > 0 and finite, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise DPOArgumentError("label_smoothing", f"must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in get_args(LossType):
        raise DPOArgumentError("loss_type", f"must be 'sigmoid', 'ipo' or 'hinge', got {loss_type!r}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise DPOArgumentError("label_smoothing", f"is cDPO's, only defined for loss_type 'sigmoid', got {loss_type!r}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: LossType = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss from sequence log-probabilities of the policy and the frozen reference.

    With h = (pc - pr) - (rc - rr):

    - ``sigmoid`` (DPO; cDPO when ``label_smoothing`` > 0): -(1 - ls) logsigmoid(beta h) - ls logsigmoid(-beta h)
    - ``ipo``: (h - 1 / (2 beta))^2
    - ``hinge`` (SLiC without its SFT term): relu(1 - beta h)

    Args:
        policy_chosen_logps: (B,) log pi(y+ | x), summed over response tokens.
        policy_rejected_logps: (B,) log pi(y- | x).
        ref_chosen_logps: (B,) log pi_ref(y+ | x); no gradient flows into it in practice.
        ref_rejected_logps: (B,) log pi_ref(y- | x).
        beta: inverse temperature, > 0.
        label_smoothing: cDPO's assumed probability that a preference label is flipped, in [0, 0.5);
            only for ``sigmoid``.
        loss_type: which loss.

    Returns:
        ``losses (B,)``, ``chosen_rewards (B,)`` and ``rejected_rewards (B,)``; rewards are
        beta * (policy - ref), detached. Average ``losses`` yourself.
    """
    check_dpo_args(beta, label_smoothing, loss_type)
    shape = policy_chosen_logps.shape
    for t in (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        if t.shape != shape:
            raise ValueError(f"log-probabilities must all be (B,), got {tuple(shape)} and {tuple(t.shape)}")

    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = F.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
