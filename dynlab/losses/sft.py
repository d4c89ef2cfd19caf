"""Supervised finetuning loss: negative log-likelihood of the response tokens."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from dynlab.losses.logps import segment_mean, segment_sum


def sft_loss(
    token_logps: Tensor,
    seq_index: Tensor | None = None,
    num_seqs: int | None = None,
    reduction: Literal["token_mean", "sequence_mean", "sum"] = "token_mean",
) -> Tensor:
    """Negative log-likelihood of response tokens, reduced to a scalar.

    Args:
        token_logps: (N,) log pi(y_n | context) of every response token in the batch (see ``token_logps``).
        seq_index: (N,) int64 sequence of each token in [0, num_seqs); needed for ``sequence_mean``.
        num_seqs: B; needed for ``sequence_mean``.
        reduction: ``token_mean`` averages over all N tokens (the usual SFT loss); ``sequence_mean`` averages
            each sequence's per-token mean over the sequences that have response tokens; ``sum`` sums over
            all tokens (the paper's -sum_l log pi(y_l | chi_<l), summed over the batch).

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
    if reduction == "sequence_mean":
        if seq_index is None or num_seqs is None:
            raise ValueError("reduction='sequence_mean' needs seq_index and num_seqs")
        per_seq = segment_mean(nll, seq_index, num_seqs)  # (B,), 0 for a sequence without tokens
        num_nonempty = (segment_sum(nll.new_ones(nll.shape), seq_index, num_seqs) > 0).sum()  # no host sync
        return per_seq.sum() / num_nonempty.clamp(min=1)
    raise ValueError(f"reduction must be 'token_mean', 'sequence_mean' or 'sum', got {reduction!r}")
