"""Batched, seeded generation from a causal LM: samples for the chosen_initial probe type, the on-policy negatives
and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

HH_STOP = ("\n\nHuman:", "\n\nAssistant:")


class _Check(StoppingCriteria):
    """Calls ``check`` after every generated token (it raises to stop generation); never stops a sequence itself."""

    def __init__(self, check: Callable[[], None]):
        self.check = check

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (token ids) as one left-padded batch, so every prompt ends where generation starts.
    B prompts -> ``(input_ids (B, W), attention_mask (B, W))``, W the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(list(p)), 1
    return ids, mask


@torch.no_grad()
def generate_batches(model: PreTrainedModel, prompts: Sequence[Sequence[int]], *, pad_token_id: int,
                     eos_token_id: int | None, max_new_tokens: int, do_sample: bool, temperature: float,
                     top_p: float, seed: int, batch_size: int,
                     check: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """The loop both generators share: each prompt's new tokens, batch by batch.

    Prompts are left-padded and generated in batches of ``batch_size`` with ``model.generate`` and its KV cache
    (``top_k`` off; temperature and top_p only when sampling); batch ``start`` (the index of its first prompt) draws
    from torch seed ``seed + start`` under a forked RNG, so the result depends on ``seed`` and the batch layout alone
    and the global RNG state is untouched. ``check`` is called before every batch and after every generated token
    (an exception it raises ends the call); the model is back in its mode afterwards.
    B prompts -> one (batch, new tokens) tensor per batch, on the model's device: padding only follows an EOS.
    """
    device = next(model.parameters()).device
    criteria = StoppingCriteriaList([_Check(check)]) if check is not None else None
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(prompts), batch_size):
            if check is not None:
                check()
            ids, mask = left_padded(prompts[start : start + batch_size], pad_token_id)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + start)
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           max_new_tokens=max_new_tokens, do_sample=do_sample,
                                           temperature=temperature if do_sample else None,
                                           top_p=top_p if do_sample else None, top_k=None,
                                           pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                           stopping_criteria=criteria)
            out.append(generated[:, ids.shape[1]:])  # (batch, new tokens)
    finally:
        model.train(was_training)
    return out


def generate_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                       *, max_new_tokens: int = 48, do_sample: bool = True, temperature: float = 1.0,
                       top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                       stop: Sequence[str] = HH_STOP, check: Callable[[], None] | None = None) -> list[str]:
    """One response per prompt (token ids), decoded without special tokens and cut at the first ``stop`` string.

    Prompts are left-padded and generated in batches of ``batch_size``; the sampling RNG is seeded per batch, so
    the result depends on ``seed`` and the batch layout alone, not on the global RNG state. ``check`` is called
    before every batch and after every generated token: an exception it raises (a pending stop) ends the call
    within one token, and the model is back in its mode.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for batch in generate_batches(model, prompts, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                  max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, seed=seed, batch_size=batch_size, check=check):
        for row in batch:
            text = tokenizer.decode(row, skip_special_tokens=True)
            for s in stop:
                text = text.split(s)[0]
            out.append(text.rstrip())
    return out


def generate_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                       *, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 8, do_sample: bool = True,
                       check: Callable[[], None] | None = None) -> list[list[int]]:
    """One sampled response per prompt (token ids), as ids: cut after the first EOS (the EOS kept), no padding; a
    response with no token is ``[eos]``.

    Prompts are left-padded and sampled in batches of ``batch_size`` with ``model.generate`` and its KV cache; batch
    ``start`` (the index of its first prompt) draws from torch seed ``seed + start`` under a forked RNG, so the result
    depends on ``seed`` and the batch layout alone and the global RNG state is untouched. ``do_sample=False`` decodes
    greedily (temperature and top_p unused). ``check`` is called before every batch and after every generated token
    (an exception it raises ends the call); the model is back in its mode afterwards.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[list[int]] = []
    for batch in generate_batches(model, prompts, pad_token_id=pad, eos_token_id=eos, max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                                  batch_size=batch_size, check=check):
        for row in batch.tolist():  # padding only follows an EOS
            cut = row[: row.index(eos) + 1] if eos in row else row
            out.append(cut or [eos])
    return out
