"""Direct preference losses on summed response log-probabilities: DPO / cDPO, IPO, hinge, SLiC-HF, SPPO (hard),
DPOP (Smaug), RPO and the reference-free SimPO."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor

LossType = Literal["sigmoid", "ipo", "hinge", "slic", "sppo_hard", "dpop", "rpo", "simpo"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})
# the loss types that read each length argument: (B,) response-token counts
CHOSEN_LENGTH_LOSSES: frozenset[str] = frozenset({"slic", "rpo", "simpo"})
REJECTED_LENGTH_LOSSES: frozenset[str] = frozenset({"simpo"})


class DPOArgumentError(ValueError):
    """A bad :func:`dpo_loss` argument; ``argument`` names it (``beta``, ``label_smoothing``, ``loss_type``,
    ``delta``, ``nll_weight``, ``dpop_lambda``, ``gamma``, or a tensor argument such as ``chosen_lengths``)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument} {message}")
        self.argument, self.message = argument, message


def _non_negative(name: str, value: float) -> None:
    if not 0 <= value < math.inf:  # also refuses nan
        raise DPOArgumentError(name, f"must be >= 0 and finite, got {value}")


def check_dpo_args(beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid", *, delta: float = 1.0,
                   nll_weight: float = 1.0, dpop_lambda: float = 50.0, gamma: float = 0.5) -> None:
    """Raise :class:`DPOArgumentError` unless ``beta`` is finite and > 0, ``label_smoothing`` is in [0, 0.5) and
    only set with the ``sigmoid`` loss, ``loss_type`` is one of :data:`LossType`, and ``delta``, ``nll_weight``,
    ``dpop_lambda`` and ``gamma`` are finite and >= 0."""
    if not 0 < beta < math.inf:
        raise DPOArgumentError("beta", f"must be > 0 and finite, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise DPOArgumentError("label_smoothing", f"must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in LOSS_TYPES:
        valid = ", ".join(repr(t) for t in LOSS_TYPES)
        raise DPOArgumentError("loss_type", f"must be one of {valid}; got {loss_type!r}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise DPOArgumentError("label_smoothing", f"is cDPO's, only defined for loss_type 'sigmoid', got {loss_type!r}")
    for name, value in (("delta", delta), ("nll_weight", nll_weight), ("dpop_lambda", dpop_lambda), ("gamma", gamma)):
        _non_negative(name, value)


def _lengths(name: str, lengths: Tensor | None, like: Tensor, loss_type: str) -> Tensor:
    """``lengths`` (B,) as ``like``'s dtype, refused when missing, mis-shaped or < 1."""
    if lengths is None:
        raise DPOArgumentError(name, f"is required by loss_type {loss_type!r} (the (B,) response-token counts)")
    if lengths.shape != like.shape:
        raise DPOArgumentError(name, f"must be (B,) like the log-probabilities {tuple(like.shape)}, "
                                     f"got {tuple(lengths.shape)}")
    if (lengths < 1).any():
        raise DPOArgumentError(name, f"must count at least 1 response token per pair, got {lengths.tolist()}")
    return lengths.to(like.dtype)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: LossType = "sigmoid",
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    delta: float = 1.0,
    nll_weight: float = 1.0,
    dpop_lambda: float = 50.0,
    gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss from sequence log-probabilities of the policy and the frozen reference.

    With pc, pr, rc, rr = log pi(y+), log pi(y-), log pi_ref(y+), log pi_ref(y-), the log-ratio margin
    h = (pc - pr) - (rc - rr), |y| the response-token count and NLL(y+) = -pc / |y+| (the per-token mean, as TRL's
    ``rpo_alpha`` and the RPO paper normalise it, so the term's scale does not grow with the response length):

    - ``sigmoid`` (DPO, Rafailov et al. 2023; cDPO when ``label_smoothing`` > 0):
      -(1 - ls) logsigmoid(beta h) - ls logsigmoid(-beta h)
    - ``ipo`` (Azar et al. 2023): (h - 1 / (2 beta))^2
    - ``hinge`` (SLiC's calibration term with margin 1 / beta): relu(1 - beta h)
    - ``slic`` (SLiC-HF, Zhao et al. 2023, eq. 1, with two changes: the reference-adjusted margin h where the paper
      uses the policy's own log-ratio, and the per-token NLL where it sums over y+): relu(delta - h)
      + nll_weight NLL(y+); ``beta`` only scales the logged rewards.
    - ``sppo_hard`` (SPPO, Wu et al. 2024, as TRL's ``sppo_hard``): (r+ - 1 / (2 beta))^2 + (r- + 1 / (2 beta))^2
      with r+ = pc - rc, r- = pr - rr.
    - ``dpop`` (DPO-Positive, Smaug, Pal et al. 2024, eq. 3): -logsigmoid(beta (h - dpop_lambda max(0, rc - pc))),
      the penalty inside the sigmoid as the paper writes it (not added outside the log-sigmoid).
    - ``rpo`` (Pang et al. 2024, TRL's ``rpo_alpha``): -logsigmoid(beta h) + nll_weight NLL(y+).
    - ``simpo`` (Meng et al. 2024, eq. 6): -logsigmoid(beta pc / |y+| - beta pr / |y-| - gamma); reference-free, the
      references may be None and are ignored.

    Args:
        policy_chosen_logps: (B,) log pi(y+ | x), summed over response tokens.
        policy_rejected_logps: (B,) log pi(y- | x).
        ref_chosen_logps: (B,) log pi_ref(y+ | x); no gradient flows into it in practice. None only for ``simpo``.
        ref_rejected_logps: (B,) log pi_ref(y- | x). None only for ``simpo``.
        beta: inverse temperature, > 0 (SimPO's reward scale, 2-10 in its paper, for ``simpo``).
        label_smoothing: cDPO's assumed probability that a preference label is flipped, in [0, 0.5);
            only for ``sigmoid``.
        loss_type: which loss.
        chosen_lengths: (B,) response-token counts of y+, >= 1; required by ``slic``, ``rpo`` and ``simpo``.
        rejected_lengths: (B,) response-token counts of y-, >= 1; required by ``simpo``.
        delta: ``slic``'s hinge margin on h, >= 0 (SLiC-HF's delta, 1.0 there).
        nll_weight: weight of NLL(y+), >= 0: SLiC-HF's lambda for ``slic``, RPO's alpha for ``rpo`` (1.0 in both).
        dpop_lambda: ``dpop``'s penalty weight, >= 0 (50, the Smaug paper's value).
        gamma: ``simpo``'s target reward margin, >= 0. 0.5 is TRL's ``simpo_gamma`` default; the SimPO paper tunes
            gamma / beta (about 0.1-0.8 with beta 2-10), so set gamma with beta.

    Returns:
        ``losses (B,)``, ``chosen_rewards (B,)`` and ``rejected_rewards (B,)``, detached: beta * (policy - ref),
        or beta * policy / |y| for ``simpo``. Average ``losses`` yourself.
    """
    check_dpo_args(beta, label_smoothing, loss_type, delta=delta, nll_weight=nll_weight, dpop_lambda=dpop_lambda,
                   gamma=gamma)
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    shape = pc.shape
    if loss_type not in REFERENCE_FREE:
        for name, t in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr)):
            if t is None:
                raise DPOArgumentError(name, f"is None, but loss_type {loss_type!r} needs the reference's "
                                             f"log-probabilities (only {sorted(REFERENCE_FREE)} is reference-free)")
    for t in (pr, rc, rr):
        if t is not None and t.shape != shape:
            raise ValueError(f"log-probabilities must all be (B,), got {tuple(shape)} and {tuple(t.shape)}")
    len_c = _lengths("chosen_lengths", chosen_lengths, pc, loss_type) if loss_type in CHOSEN_LENGTH_LOSSES else None
    len_r = _lengths("rejected_lengths", rejected_lengths, pr, loss_type) if loss_type in REJECTED_LENGTH_LOSSES \
        else None

    if loss_type == "simpo":
        chosen_reward, rejected_reward = beta * pc / len_c, beta * pr / len_r  # (B,)
        losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
        return losses, chosen_reward.detach(), rejected_reward.detach()

    h = (pc - pr) - (rc - rr)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * h)
    elif loss_type == "slic":
        losses = F.relu(delta - h) + nll_weight * (-pc / len_c)
    elif loss_type == "sppo_hard":
        losses = ((pc - rc) - 1 / (2 * beta)) ** 2 + ((pr - rr) + 1 / (2 * beta)) ** 2
    elif loss_type == "dpop":
        losses = -F.logsigmoid(beta * (h - dpop_lambda * F.relu(rc - pc)))
    else:  # rpo
        losses = -F.logsigmoid(beta * h) + nll_weight * (-pc / len_c)
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    return losses, chosen_rewards, rejected_rewards
