"""Per-token probe statistics of the predictive distribution (squeezing, argmax mass, A and G norms),
and their per-sequence reduction. Pure tensor maths, float32, chunked over tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from dynlab.losses.logps import segment_mean, segment_sum

SUM_METRICS = ("logp", "argmax_logp", "except_argmax_logp")  # summed over the response tokens
MEAN_METRICS = ("max_prob", "peakiness", "entropy", "a_norm", "p_e", "energy")  # averaged over the response tokens
SEQUENCE_METRICS = SUM_METRICS + MEAN_METRICS
ANormReduction = Literal["token_mean", "paper"]


@torch.no_grad()
def token_stats(logits: Tensor, targets: Tensor, chunk_size: int = 16) -> dict[str, Tensor]:
    """Per-token statistics of pi = softmax(logits), computed in float32 without gradients.

    - ``logp`` = log pi(y); ``argmax_logp`` = log max_v pi(v) (always >= ``logp``); ``max_prob`` = max_v pi(v)
    - ``except_argmax_logp`` = log(1 - max_v pi(v)): the log of the sum over every column but the argmax where
      max_v pi(v) >= 1/2, so it stays finite when max_v pi(v) rounds to 1 in float32, and log1p(-max_v pi(v)) in
      float64 below, so it keeps its relative precision when max_v pi(v) is tiny
    - ``peakiness`` = ||pi||^2 (1/V uniform ... 1 one-hot); ``entropy`` = -sum_v pi log pi (0 log 0 = 0)
    - ``a_norm`` = ||I - 1 pi^T||_F = sqrt(V - 2 + V ||pi||^2) (sqrt(V - 1) uniform ... sqrt(2V - 2) one-hot)
    - ``p_e`` = ||pi - e_y||_2 in [0, sqrt 2]; ``energy`` = 1 - pi(y) in [0, 1]

    Args:
        logits: (N, V) logits at response positions, any float dtype.
        targets: (N,) int64 next-token ids in [0, V).
        chunk_size: rows processed at once; bounds the live float32 memory to a few (chunk_size, V) tensors, and
            small chunks stay in cache: 16 rows of a 49k vocabulary make the passes over V 2.6x faster than 1024.

    One exponential per logit: with e = exp(z - max z) and S = sum_v e_v, pi = e / S, log max pi = -log S, and every
    statistic is a sum over e (a third of the time of computing log_softmax, then exp, then a masked logsumexp).

    Returns:
        Name -> (N,) float32 tensor, for every name in ``SEQUENCE_METRICS``.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, V), targets (N,); got {tuple(logits.shape)}, {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, vocab = logits.shape
    out = {name: logits.new_empty(n, dtype=torch.float32) for name in SEQUENCE_METRICS}
    targets = targets.long()
    tiny = torch.finfo(torch.float32).tiny
    for s in range(0, n, chunk_size):
        rows, y = slice(s, s + chunk_size), targets[s : s + chunk_size, None]  # y (c, 1)
        z = logits[rows].float()  # (c, V)
        # one exponential pass: e = exp(z - max z), every statistic from e and its sum S (pi = e / S). The
        # reductions over V are sums (pairwise in float32), not einsum's dot products: those lose ~1e-4 relative.
        top, argmax = z.max(dim=-1, keepdim=True)  # (c, 1)
        shifted = z - top  # <= 0; -inf where a logit is -inf (a new tensor: z may be the caller's logits)
        e = shifted.exp()  # (c, V), in (0, 1], exactly 1 at the argmax
        total = e.sum(dim=-1)  # S >= 1
        log_total = total.log()
        e_y = e.gather(1, y).squeeze(1)
        logp = shifted.gather(1, y).squeeze(1) - log_total
        out["logp"][rows] = logp
        out["argmax_logp"][rows] = -log_total  # log(1 / S)
        out["max_prob"][rows] = 1 / total
        # entropy = log S + sum_v e_v (max - z_v) / S: two non-negative terms, no cancellation near a one-hot; a -inf
        # logit has e = 0, and clamping its shift to the float32 minimum makes 0 * shift = 0 instead of NaN
        spread = shifted.clamp_(min=torch.finfo(torch.float32).min).mul_(e).sum(dim=-1)
        out["entropy"][rows] = log_total - spread / total
        # sums that leave one column out are taken without it, never as a total minus a number close to it:
        # sum_{v != argmax} e_v for log(1 - max pi), sum_{v != y} e_v for 1 - pi(y), sum_{v != y} e_v^2 for p_e
        # (the column is zeroed in place, and the argmax's e = exp(0) = 1 put back)
        off_argmax = e.scatter_(1, argmax, 0.0).sum(dim=-1)
        off_y = e.scatter_(1, argmax, 1.0).scatter_(1, y, 0.0).sum(dim=-1)
        off_y_squares = e.square_().sum(dim=-1)
        peak = (off_y_squares + e_y.square()) / total.square()  # ||pi||^2
        out["peakiness"][rows] = peak
        out["a_norm"][rows] = (vocab - 2 + vocab * peak).clamp(min=0).sqrt()
        # where pi(y) <= 1/2, 1 - pi(y) directly is exact enough and needs no second look
        energy = torch.where(2 * e_y > total, off_y / total, 1 - e_y / total)
        out["energy"][rows] = energy
        # ||pi - e_y||^2 = sum_{v != y} pi_v^2 + (1 - pi(y))^2
        out["p_e"][rows] = (off_y_squares / total.square() + energy.square()).sqrt()
        # log(1 - max pi): where max pi >= 1/2, log(sum_{v != argmax} e_v / S), never 1 - a number that rounded to
        # 1; below, log1p(-1 / S) in float64, since a difference of two float32 logs near log S resolves it only to
        # ~1e-7 absolute, 1e-3 relative for max pi ~ 1e-4
        total64 = total.double()
        out["except_argmax_logp"][rows] = torch.where(
            2 > total, off_argmax.double().clamp(min=tiny).log() - total64.log(), torch.log1p(-1 / total64)).float()
    return out


def sequence_stats(token_stats: dict[str, Tensor], seq_index: Tensor, num_seqs: int,
                   a_norm: ANormReduction = "token_mean", vocab_size: int | None = None) -> dict[str, Tensor]:
    """Reduce per-token statistics to per-sequence ones: ``SUM_METRICS`` summed, ``MEAN_METRICS`` averaged.

    Args:
        token_stats: name -> (N,) per-token values (from ``token_stats``; any subset of ``SEQUENCE_METRICS``).
        seq_index: (N,) int64 sequence of each token, in [0, num_seqs).
        num_seqs: B, the number of sequences.
        a_norm: ``token_mean`` (``a_norm`` is the mean of the per-token ||A_m||_F, dynlab's definition) or
            ``paper`` (the original code's A_o, see ``paper_a_norm``; needs ``peakiness`` and ``vocab_size``).
        vocab_size: V, for ``a_norm="paper"``.

    Returns:
        Name -> (B,) tensor. A sequence without tokens gets 0 for every metric.
    """
    out = {}
    for name, values in token_stats.items():
        if name in SUM_METRICS:
            out[name] = segment_sum(values, seq_index, num_seqs)
        elif name in MEAN_METRICS:
            out[name] = segment_mean(values, seq_index, num_seqs)
        else:
            raise ValueError(f"unknown token statistic {name!r}; expected one of {SEQUENCE_METRICS}")
    if a_norm == "paper":
        if vocab_size is None or "peakiness" not in token_stats:
            raise ValueError("a_norm='paper' needs the peakiness token statistic and vocab_size")
        out["a_norm"] = paper_a_norm(token_stats["peakiness"], seq_index, num_seqs, vocab_size)
    elif a_norm != "token_mean":
        raise ValueError(f"a_norm must be 'token_mean' or 'paper', got {a_norm!r}")
    return out


def paper_a_norm(peakiness: Tensor, seq_index: Tensor, num_seqs: int, vocab_size: int) -> Tensor:
    """The original code's per-sequence ``A_o`` = sqrt(V (mean_m ||pi_m||_2)^2 + V - 2) (``_get_batch_logps``).

    It squares the MEAN of the per-token norms instead of averaging each token's ||I - 1 pi_m^T||_F =
    sqrt(V - 2 + V ||pi_m||^2), so by Jensen it is at most dynlab's ``a_norm`` (equal when every token's ||pi_m|| is
    the same); kept to compare with the paper's figures.

    Args:
        peakiness: (N,) ||pi_n||^2 of every token (``token_stats``).
        seq_index: (N,) int64 sequence of each token, in [0, num_seqs).
        num_seqs: B.
        vocab_size: V.

    Returns:
        (B,) float32; 0 for a sequence without tokens (the original code gives NaN there).
    """
    mean_norm = segment_mean(peakiness.clamp(min=0).sqrt(), seq_index, num_seqs)  # (B,)
    has_tokens = segment_sum(torch.ones_like(peakiness), seq_index, num_seqs) > 0
    a_o = (vocab_size * mean_norm.square() + (vocab_size - 2)).sqrt()
    return torch.where(has_tokens, a_o, torch.zeros_like(a_o))
