"""Likelihood-displacement diagnostics of a preference pair: CHES (Razin et al. 2024), the token edit distance and
first differing position of y+ and y- (Smaug/DPOP), and the rate ratio Delta log pi(y-) / Delta log pi(y+) (Feng et al.
2024). Pure tensor and list maths: the probe forward feeds it the hidden states it already has. And the accumulator of
the probe pairs' gradient entanglement (``dynlab.dynamics.influence.gradient_entanglement``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

PAIR_STATS = ("ches", "ches_norm", "edit_distance", "edit_distance_norm", "first_diff")
ENTANGLEMENT_STATS = ("dot", "sq_chosen", "sq_rejected", "cosine")  # as gradient_entanglement returns them
RATE_MIN_ABS_CHANGE = 1e-3  # nats: |Delta log pi(y+)| below this makes a rate ratio undefined (NaN)


def hidden_sums(hidden: Tensor, seq_index: Tensor, num_seqs: int) -> Tensor:
    """Sum of each sequence's hidden states, accumulated in float64 (the sums of a few hundred states are large and
    CHES takes a difference of their inner products).

    Args:
        hidden: (N, H) final-layer states (after the final norm) at the positions that predict response tokens.
        seq_index: (N,) int64 sequence of each state, in [0, num_seqs).
        num_seqs: B.

    Returns:
        (B, H) float64 W_y = sum_k h_k per sequence; zeros for a sequence without states.
    """
    if hidden.dim() != 2 or seq_index.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, H), seq_index (N,); got {tuple(hidden.shape)}, {tuple(seq_index.shape)}")
    out = hidden.new_zeros((num_seqs, hidden.shape[1]), dtype=torch.float64)
    return out.index_add_(0, seq_index, hidden.detach().double())


def pair_hidden_sums(members: Sequence[tuple[int, str]], hidden: Tensor, seq_index: Tensor,
                     row_ids: Sequence[int], types: tuple[str, ...] = ("chosen", "rejected")) -> dict[tuple[int, str],
                                                                                                       Tensor]:
    """``hidden_sums`` of the members of one scored group whose response type is in ``types``.

    Args:
        members: the group's (batch row k, type) pairs (``shared_prompt_hidden_rows``).
        hidden: (N, H) the group's states; seq_index: (N,) their member, in [0, len(members)).
        row_ids: probe row id of each batch row k.
        types: the response types to sum.

    Returns:
        ``{(probe row id, type): (H,) float64}``.
    """
    wanted = [j for j, (_, name) in enumerate(members) if name in types]
    if not wanted:
        return {}
    if len(wanted) < len(members):  # only the pairs' states go to float64
        keep = torch.isin(seq_index, torch.tensor(wanted, device=seq_index.device))
        hidden, seq_index = hidden[keep], seq_index[keep]
    sums = hidden_sums(hidden, seq_index, len(members))
    return {(row_ids[members[j][0]], members[j][1]): sums[j] for j in wanted}


def ches(chosen_sum: Tensor, rejected_sum: Tensor, chosen_len: Tensor, rejected_len: Tensor) -> tuple[Tensor, Tensor]:
    """Centered hidden embedding similarity (Razin et al. 2024, Definition 2) and its length-normalised form.

    CHES = <W+, W-> - ||W+||^2 and CHES_norm = <W+/|y+|, W-/|y-|> - ||W+||^2/|y+|^2, with W = sum of the hidden states
    that predict the response's tokens. A large CHES means y- looks like y+ to the model: training up y+ and down y-
    then displaces y+ (its likelihood falls).

    Args:
        chosen_sum: (B, H) W+ (``hidden_sums``), float64 preferably.
        rejected_sum: (B, H) W-.
        chosen_len: (B,) |y+| in tokens (> 0).
        rejected_len: (B,) |y-| in tokens (> 0).

    Returns:
        ``(ches (B,), ches_norm (B,))``, float32 (computed in float64).
    """
    if chosen_sum.shape != rejected_sum.shape or chosen_sum.dim() != 2:
        raise ValueError(f"expected two (B, H) sums, got {tuple(chosen_sum.shape)}, {tuple(rejected_sum.shape)}")
    c, r = chosen_sum.double(), rejected_sum.double()
    nc, nr = chosen_len.to(c).clamp(min=1), rejected_len.to(c).clamp(min=1)  # (B,)
    cross, own = (c * r).sum(dim=-1), (c * c).sum(dim=-1)  # (B,)
    return (cross - own).float(), (cross / (nc * nr) - own / nc.square()).float()


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token id sequences (unit insert, delete, substitute), O(|a| |b|) with one
    numpy pass per token of ``a``."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    b_arr = np.asarray(b)
    cols = np.arange(m + 1)
    prev = cols.copy()
    for i, token in enumerate(a, 1):
        # the best of a substitution/match (diagonal) and a deletion (from above), then insertions along the row:
        # cur[j] = min_{k <= j} (t[k] + j - k), a running minimum of t[k] - k
        t = np.empty(m + 1, dtype=prev.dtype)
        t[0] = i
        t[1:] = np.minimum(prev[:-1] + (b_arr != token), prev[1:] + 1)
        prev = np.minimum.accumulate(t - cols) + cols
    return int(prev[-1])


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """The first index where ``a`` and ``b`` differ; ``min(|a|, |b|)`` when one is a prefix of the other."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def pair_edit_stats(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """Token edit statistics of B pairs.

    Args:
        chosen: B token id sequences y+.
        rejected: B token id sequences y-.

    Returns:
        ``edit_distance`` (B,) Levenshtein distance, ``edit_distance_norm`` (B,) that over max(|y+|, |y-|) (0 for two
        empty responses), ``first_diff`` (B,) ``first_difference``; float32.
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"expected as many chosen as rejected responses, got {len(chosen)} and {len(rejected)}")
    dist = [edit_distance(c, r) for c, r in zip(chosen, rejected)]
    longest = [max(len(c), len(r), 1) for c, r in zip(chosen, rejected)]
    return {"edit_distance": torch.tensor(dist, dtype=torch.float32),
            "edit_distance_norm": torch.tensor([d / n for d, n in zip(dist, longest)], dtype=torch.float32),
            "first_diff": torch.tensor([first_difference(c, r) for c, r in zip(chosen, rejected)],
                                       dtype=torch.float32)}


def rate_ratio(delta_rejected: Tensor, delta_chosen: Tensor, min_abs_change: float = RATE_MIN_ABS_CHANGE) -> Tensor:
    """Per-pair rate ratio Delta log pi(y-) / Delta log pi(y+) (Feng et al. 2024), NaN where |Delta log pi(y+)| <
    ``min_abs_change`` (a change within float32 noise of the summed log-probs: the ratio would be noise).

    delta_rejected, delta_chosen (B,) -> (B,) float32
    """
    if delta_rejected.shape != delta_chosen.shape:
        raise ValueError(f"expected (B,) and (B,), got {tuple(delta_rejected.shape)}, {tuple(delta_chosen.shape)}")
    dc, dr = delta_chosen.double(), delta_rejected.double()
    return torch.where(dc.abs() >= min_abs_change, dr / dc, float("nan")).float()


def top_fraction(scores: Sequence[float], fraction: float) -> list[int]:
    """Indices of the ``floor(fraction * len(scores))`` highest scores, highest first (ties: the lower index first),
    the pairs ``data.drop_most_displacing`` drops. NaN scores rank last.

    Args:
        scores: one score per item (normalised CHES per pair).
        fraction: in [0, 1).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    count = int(fraction * len(scores) + 1e-9)  # 0.29 x 100 is 28.999999999999996 in floating point
    order = sorted(range(len(scores)), key=lambda i: (np.isnan(scores[i]), -scores[i] if not np.isnan(scores[i])
                                                      else 0.0, i))
    return order[:count]


class EntanglementMetric(Metric):
    """Means over probe pairs of the gradient entanglement (Yuan et al. 2024): ``dot`` = <g+, g->, ``sq_chosen`` =
    ||g+||^2, ``sq_rejected`` = ||g-||^2 and ``cosine``, with g = grad_theta log pi(y | x) of each response.

    ``compute`` keys them ``entanglement/{name}``, as they are logged: ``probe/{split}/entanglement/{name}``.

    Args:
        kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> metric = EntanglementMetric()
        >>> metric.update({name: torch.tensor([1.0, 3.0]) for name in ENTANGLEMENT_STATS})
        >>> metric.update({name: torch.tensor([8.0]) for name in ENTANGLEMENT_STATS})
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}  # doctest: +NORMALIZE_WHITESPACE
        {'entanglement/dot': 4.0, 'entanglement/sq_chosen': 4.0, 'entanglement/sq_rejected': 4.0,
         'entanglement/cosine': 4.0}
    """

    full_state_update = False
    higher_is_better = None  # a diagnostic, not a score
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sums", torch.zeros(len(ENTANGLEMENT_STATS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: dict[str, Tensor]) -> None:
        """Add a batch of pairs.

        Args:
            stats: every name of ``ENTANGLEMENT_STATS`` -> (B,) per-pair values (no others).
        """
        if sorted(stats) != sorted(ENTANGLEMENT_STATS):
            raise ValueError(f"EntanglementMetric.update: expected the statistics {ENTANGLEMENT_STATS}, got "
                             f"{sorted(stats)}")
        shapes = {name: tuple(v.shape) for name, v in stats.items()}
        if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) > 1:
            raise ValueError(f"EntanglementMetric.update: expected 1-D tensors of one shape (B,), got {shapes}")
        self.sums += torch.stack([stats[n].detach().double().sum() for n in ENTANGLEMENT_STATS]).to(self.sums)
        self.count += stats[ENTANGLEMENT_STATS[0]].numel()

    def compute(self) -> dict[str, Tensor]:
        """``entanglement/{name}`` -> mean over every pair seen (float32 scalars); empty before any pair."""
        if self.count == 0:
            return {}
        return {f"entanglement/{n}": (self.sums[i] / self.count).float() for i, n in enumerate(ENTANGLEMENT_STATS)}
