"""Direct preference losses (DPO / cDPO, IPO, hinge) on summed response log-probabilities."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
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
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is only defined for loss_type='sigmoid', got loss_type={loss_type!r}")
    shape = policy_chosen_logps.shape
    for t in (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        if t.shape != shape:
            raise ValueError(f"log-probabilities must all be (B,), got {tuple(shape)} and {tuple(t.shape)}")

    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be 'sigmoid', 'ipo' or 'hinge', got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
