"""torchmetrics accumulators over probe examples: per-sequence statistics of one probe type, preference
margins/accuracies of chosen vs rejected, and the pairs' displacement diagnostics (CHES, edit distance, rate ratio).
Sum/count states reduced with "sum", so DDP equals one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from dynlab.metrics.displacement import PAIR_STATS, RATE_MIN_ABS_CHANGE, rate_ratio
from dynlab.metrics.functional import SEQUENCE_METRICS


def _check_1d_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) > 1:
        raise ValueError(f"expected 1-D tensors of one shape (B,), got {shapes}")


class ProbeTypeMetric(Metric):
    """Mean over probe examples of every per-sequence statistic for ONE probe type (one instance per split x type).

    Every name except ``dlogp`` must be present in each ``update``; ``dlogp`` (logp minus its step-0 value) is
    optional and keeps its own count. ``compute`` leaves out a name that was never updated rather than give NaN.

    Args:
        names: the statistics to track, by default ``SEQUENCE_METRICS`` and ``dlogp``.
        kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> metric = ProbeTypeMetric(names=("logp", "dlogp"))
        >>> metric.update({"logp": torch.tensor([-1.0, -3.0])})
        >>> metric.update({"logp": torch.tensor([-5.0]), "dlogp": torch.tensor([0.5])})
        >>> metric.compute()
        {'logp': tensor(-3.), 'dlogp': tensor(0.5000)}
    """

    full_state_update = False
    higher_is_better = None  # mixed: higher logp is better, higher entropy is not
    is_differentiable = False

    OPTIONAL = ("dlogp",)

    def __init__(self, names: Sequence[str] = SEQUENCE_METRICS + ("dlogp",), **kwargs) -> None:
        super().__init__(**kwargs)
        self.names = tuple(names)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be non-empty and unique, got {self.names}")
        self.required = tuple(n for n in self.names if n not in self.OPTIONAL)
        # one vector state per kind (K,) so DDP sync is two collectives, not 2K
        self.add_state("sums", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: dict[str, Tensor]) -> None:
        """Add a batch of probe examples.

        Args:
            stats: name -> (B,) per-sequence values (e.g. from ``sequence_stats``); every name in ``names``
                except ``dlogp``, and no others.
        """
        missing = [n for n in self.required if n not in stats]
        unknown = [n for n in stats if n not in self.names]
        if missing or unknown:
            raise ValueError(f"ProbeTypeMetric.update: missing statistics {missing}, unknown statistics {unknown}")
        _check_1d_same_shape(**stats)
        for i, name in enumerate(self.names):
            if name in stats:
                values = stats[name].detach()
                self.sums[i] += values.sum().to(self.sums.dtype)
                self.counts[i] += values.numel()

    def compute(self) -> dict[str, Tensor]:
        """Name -> mean over every probe example seen (scalar, float32); names never updated are left out."""
        return {
            name: (self.sums[i] / self.counts[i]).float() for i, name in enumerate(self.names) if self.counts[i] > 0
        }


class PreferenceMetric(Metric):
    """margin, ranking_accuracy and, given reference log-probabilities, reward_margin and reward_accuracy,
    averaged over probe pairs (chosen vs rejected).

    - ``margin`` = mean(logp+ - logp-); ``ranking_accuracy`` = fraction with logp+ - logp- > 0
    - ``reward_margin`` = mean(beta ((logp+ - ref+) - (logp- - ref-))); ``reward_accuracy`` = fraction > 0

    Args:
        beta: the DPO beta the rewards are scaled by, > 0.
        kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> metric = PreferenceMetric(beta=0.5)
        >>> metric.update(torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0]),
        ...               torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -4.0]))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'margin': 0.0, 'ranking_accuracy': 0.5, 'reward_margin': -0.5, 'reward_accuracy': 0.5}
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, beta: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = beta
        for name in ("margin_sum", "ranked", "count", "reward_margin_sum", "rewarded", "reward_count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        chosen_logp: Tensor,
        rejected_logp: Tensor,
        chosen_ref_logp: Tensor | None = None,
        rejected_ref_logp: Tensor | None = None,
    ) -> None:
        """Add a batch of pairs.

        Args:
            chosen_logp: (B,) policy log pi(y+ | x), summed over response tokens.
            rejected_logp: (B,) policy log pi(y- | x).
            chosen_ref_logp: (B,) reference log pi_ref(y+ | x); give both references or neither.
            rejected_ref_logp: (B,) reference log pi_ref(y- | x).
        """
        if (chosen_ref_logp is None) != (rejected_ref_logp is None):
            raise ValueError("PreferenceMetric.update: give both chosen_ref_logp and rejected_ref_logp, or neither")
        _check_1d_same_shape(chosen_logp=chosen_logp, rejected_logp=rejected_logp)
        margin = (chosen_logp.detach() - rejected_logp.detach()).double()  # (B,)
        self.margin_sum += margin.sum()
        self.ranked += (margin > 0).sum()
        self.count += margin.numel()
        if chosen_ref_logp is not None and rejected_ref_logp is not None:
            _check_1d_same_shape(
                chosen_logp=chosen_logp, chosen_ref_logp=chosen_ref_logp, rejected_ref_logp=rejected_ref_logp
            )
            ref_margin = (chosen_ref_logp.detach() - rejected_ref_logp.detach()).double()  # (B,)
            reward_margin = self.beta * (margin - ref_margin)  # (B,)
            self.reward_margin_sum += reward_margin.sum()
            self.rewarded += (reward_margin > 0).sum()
            self.reward_count += reward_margin.numel()

    def compute(self) -> dict[str, Tensor]:
        """``margin`` and ``ranking_accuracy``, plus ``reward_margin`` and ``reward_accuracy`` once references
        were given; scalars, float32. Empty dict before any pair."""
        out = {}
        if self.count > 0:
            out["margin"] = (self.margin_sum / self.count).float()
            out["ranking_accuracy"] = (self.ranked / self.count).float()
        if self.reward_count > 0:
            out["reward_margin"] = (self.reward_margin_sum / self.reward_count).float()
            out["reward_accuracy"] = (self.rewarded / self.reward_count).float()
        return out


class DisplacementMetric(Metric):
    """Means over probe pairs of the displacement diagnostics (``dynlab.metrics.displacement``), and rate ratios.

    - ``ches``, ``ches_norm``, ``edit_distance``, ``edit_distance_norm``, ``first_diff``: means over pairs
    - ``rate_ratio`` = mean(Delta log pi(y-)) / mean(Delta log pi(y+)), Delta since step 0: the ratio of the means
      (one pair whose y+ barely moved cannot dominate it); left out while |mean Delta log pi(y+)| <
      ``min_abs_change`` (at step 0 it is 0)
    - ``rate_ratio_pair_mean``: the mean of the per-pair ratios, each NaN and left out of the mean where its own
      |Delta log pi(y+)| < ``min_abs_change`` (``displacement.rate_ratio``); left out when no pair has one
    - ``rate_ratio_step`` and ``rate_ratio_step_pair_mean``: the same with Delta since the previous evaluation

    Args:
        min_abs_change: the guard on |Delta log pi(y+)| in nats.
        kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> metric = DisplacementMetric()
        >>> stats = {name: torch.tensor([1.0, 3.0]) for name in PAIR_STATS}
        >>> metric.update(stats, since_start=(torch.tensor([-1.0, 0.0]), torch.tensor([-3.0, -1.0])))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}  # doctest: +NORMALIZE_WHITESPACE
        {'ches': 2.0, 'ches_norm': 2.0, 'edit_distance': 2.0, 'edit_distance_norm': 2.0, 'first_diff': 2.0,
         'rate_ratio': 4.0, 'rate_ratio_pair_mean': 3.0}
    """

    full_state_update = False
    higher_is_better = None  # diagnostics, not scores
    is_differentiable = False

    RATES = ("rate_ratio", "rate_ratio_step")

    def __init__(self, min_abs_change: float = RATE_MIN_ABS_CHANGE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_abs_change = min_abs_change
        self.add_state("sums", torch.zeros(len(PAIR_STATS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        # per rate: [sum delta chosen, sum delta rejected, pairs, sum of the defined per-pair ratios, their count]
        self.add_state("rates", torch.zeros(len(self.RATES), 5, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: dict[str, Tensor], since_start: tuple[Tensor, Tensor] | None = None,
               since_previous: tuple[Tensor, Tensor] | None = None) -> None:
        """Add a batch of pairs.

        Args:
            stats: every name of ``PAIR_STATS`` -> (B,) per-pair values.
            since_start: ``(delta_chosen (B,), delta_rejected (B,))`` log-prob changes since step 0, if known.
            since_previous: the same since the previous evaluation, if known.
        """
        if sorted(stats) != sorted(PAIR_STATS):
            raise ValueError(f"DisplacementMetric.update: expected the statistics {PAIR_STATS}, got {sorted(stats)}")
        _check_1d_same_shape(**stats)
        self.sums += torch.stack([stats[n].detach().double().sum() for n in PAIR_STATS]).to(self.sums)
        self.count += stats[PAIR_STATS[0]].numel()
        for i, deltas in enumerate((since_start, since_previous)):
            if deltas is None:
                continue
            dc, dr = (d.detach().double() for d in deltas)
            _check_1d_same_shape(delta_chosen=dc, delta_rejected=dr)
            ratios = rate_ratio(dr, dc, self.min_abs_change).double()
            defined = ~torch.isnan(ratios)
            self.rates[i] += torch.stack([dc.sum(), dr.sum(), dc.new_tensor(dc.numel()),
                                          ratios[defined].sum(), defined.sum().to(dc)]).to(self.rates)

    def compute(self) -> dict[str, Tensor]:
        """The means (float32 scalars); a name without pairs, or a rate ratio that is undefined, is left out."""
        out = {}
        if self.count > 0:
            out.update({n: (self.sums[i] / self.count).float() for i, n in enumerate(PAIR_STATS)})
        for name, (dc, dr, n, ratio_sum, defined) in zip(self.RATES, self.rates):
            if n > 0 and (dc / n).abs() >= self.min_abs_change:
                out[name] = (dr / dc).float()
            if defined > 0:
                out[f"{name}_pair_mean"] = (ratio_sum / defined).float()
        return out
