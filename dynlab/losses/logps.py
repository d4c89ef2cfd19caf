"""Per-token log-probabilities of response tokens, and per-sequence reductions of flattened token values.

Tokens are flattened to (N,) over a batch; ``seq_index (N,)`` says which sequence b in [0, B) each belongs to.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def response_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Positions whose hidden state predicts a response token.

    The hidden state at position t predicts ``labels[:, t + 1]``, so position t is kept when that next label is
    not ``IGNORE_INDEX``. Gather hidden states with ``hidden[batch_idx, pos_idx]`` to get (N, D).

    Args:
        labels: (B, T) int64 labels aligned with ``input_ids``, ``IGNORE_INDEX`` on prompt and padding.

    Returns:
        ``batch_idx (N,)``, ``pos_idx (N,)`` and ``targets (N,)`` (the next-token ids), all int64, in row-major
        order (by b, then t). ``batch_idx`` is the ``seq_index`` the other functions take.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, T), got shape {tuple(labels.shape)}")
    next_labels = labels[:, 1:]  # (B, T - 1): next_labels[b, t] = labels[b, t + 1]
    batch_idx, pos_idx = (next_labels != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major
    return batch_idx, pos_idx, next_labels[batch_idx, pos_idx]


class _ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(logits)[n, targets[n]] in float32, chunk_size rows at a time in forward and in backward.

    Only the per-row logsumexp (N,) is saved; backward recomputes each chunk's softmax, so no (N, V) float32
    tensor is ever live (the gradient itself is (N, V) in the logits' dtype).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        n = logits.shape[0]
        out = logits.new_empty(n, dtype=torch.float32)
        lse = logits.new_empty(n, dtype=torch.float32)
        for s in range(0, n, chunk_size):
            rows = slice(s, s + chunk_size)
            z = logits[rows].float()  # (c, V)
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        logits, targets, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad = torch.empty_like(logits)
        c = ctx.chunk_size
        for s in range(0, logits.shape[0], c):
            g = grad_out[s : s + c, None].float()  # (c, 1)
            # d log pi_y / d z_v = 1[v == y] - pi_v
            p = (logits[s : s + c].float() - lse[s : s + c, None]).exp_()  # (c, V)
            p.mul_(-g).scatter_add_(1, targets[s : s + c, None], g)
            grad[s : s + c] = p
        return grad, None, None


def token_logps(logits: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """Log-probability of each target token, ``log_softmax(logits)[n, targets[n]]``, computed in float32.

    Args:
        logits: (N, V) logits of any float dtype (bf16 is upcast per chunk).
        targets: (N,) int64 token ids in [0, V).
        chunk_size: if given, process N in chunks of this many rows, in forward and backward, so at most one
            (chunk_size, V) float32 tensor is live. Differentiable either way.

    Returns:
        (N,) float32 log-probabilities.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, V), targets (N,); got {tuple(logits.shape)}, {tuple(targets.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    targets = targets.long()
    if chunk_size is None:
        z = logits.float()  # (N, V)
        return z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
    return _ChunkedTokenLogps.apply(logits, targets, chunk_size)


def segment_sum(values: Tensor, seq_index: Tensor, num_seqs: int) -> Tensor:
    """Sum token values per sequence (differentiable).

    Args:
        values: (N,) per-token values.
        seq_index: (N,) int64 sequence of each token, in [0, num_seqs).
        num_seqs: B, the number of sequences.

    Returns:
        (B,) sums; a sequence with no tokens gives 0.
    """
    if values.dim() != 1 or seq_index.shape != values.shape:
        raise ValueError(f"expected values (N,), seq_index (N,); got {tuple(values.shape)}, {tuple(seq_index.shape)}")
    return values.new_zeros(num_seqs).index_add(0, seq_index, values)


def segment_mean(values: Tensor, seq_index: Tensor, num_seqs: int) -> Tensor:
    """Mean of token values per sequence (differentiable).

    Args:
        values: (N,) per-token values.
        seq_index: (N,) int64 sequence of each token, in [0, num_seqs).
        num_seqs: B, the number of sequences.

    Returns:
        (B,) means; a sequence with no tokens gives 0.
    """
    counts = segment_sum(torch.ones_like(values), seq_index, num_seqs)  # (B,)
    return segment_sum(values, seq_index, num_seqs) / counts.clamp(min=1)
