"""Supervised finetuning loss: negative log-likelihood of the response tokens."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from dynlab.losses.logps import segment_mean, segment_sum


def sft_loss(
    token_logps: Tensor,
    seq_index: Tensor | None = None,
    num_seqs: int | None = None,
    reduction: Literal["token_mean", "sequence_mean", "sequence_sum", "sum"] = "token_mean",
) -> Tensor:
    """Negative log-likelihood of response tokens, reduced to a scalar.

    With B sequences, sequence b holding the response tokens l in S_b (N = sum_b |S_b|) and nll_l = -log pi(y_l):

    - ``token_mean``: (1/N) sum_b sum_{l in S_b} nll_l, every token weighs the same (the usual SFT loss).
    - ``sequence_mean``: the mean over the sequences with |S_b| > 0 of (1/|S_b|) sum_{l in S_b} nll_l.
    - ``sequence_sum``: (1/B) sum_b sum_{l in S_b} nll_l, each sequence's summed NLL averaged over the batch: the
      paper's objective, -sum_l log pi(y_l | chi_<l) per sequence, as its code trains it (``losses.mean()``).
      It equals ``token_mean`` times N/B, a factor that changes from batch to batch (longer responses weigh more).
    - ``sum``: sum_b sum_{l in S_b} nll_l, summed over the batch (B times ``sequence_sum``).

    Args:
        token_logps: (N,) log pi(y_n | context) of every response token in the batch (see ``token_logps``).
        seq_index: (N,) int64 sequence of each token in [0, num_seqs); needed for ``sequence_mean``.
        num_seqs: B, counting sequences without response tokens; needed for ``sequence_mean`` and
            ``sequence_sum``.
        reduction: one of the four above.

    Returns:
        Scalar loss; 0 (still attached to the graph) when there are no tokens.
    """
    if token_logps.dim() != 1:
        raise ValueError(f"token_logps must be (N,), got shape {tuple(token_logps.shape)}")
    nll = -token_logps  # (N,)
    if reduction == "token_mean":
        return nll.sum() / max(nll.numel(), 1)
    if reduction == "sum":
        return nll.sum()
    if reduction == "sequence_sum":
        if num_seqs is None or num_seqs < 1:
            raise ValueError(f"reduction='sequence_sum' needs num_seqs >= 1, got {num_seqs}")
        return nll.sum() / num_seqs
    if reduction == "sequence_mean":
        if seq_index is None or num_seqs is None:
            raise ValueError("reduction='sequence_mean' needs seq_index and num_seqs")
        per_seq = segment_mean(nll, seq_index, num_seqs)  # (B,), 0 for a sequence without tokens
        num_nonempty = (segment_sum(nll.new_ones(nll.shape), seq_index, num_seqs) > 0).sum()  # no host sync
        return per_seq.sum() / num_nonempty.clamp(min=1)
    raise ValueError(f"reduction must be 'token_mean', 'sequence_mean', 'sequence_sum' or 'sum', got {reduction!r}")
