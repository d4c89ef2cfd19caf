"""Batched, seeded generation from a causal LM: samples for the chosen_initial probe type (and later evaluation)."""

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


@torch.no_grad()
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
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    criteria = StoppingCriteriaList([_Check(check)]) if check is not None else None
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            if check is not None:
                check()
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(list(p)), 1
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + start)
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           max_new_tokens=max_new_tokens, do_sample=do_sample,
                                           temperature=temperature if do_sample else None,
                                           top_p=top_p if do_sample else None, top_k=None,
                                           pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                           stopping_criteria=criteria)
            for row in generated[:, width:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                for s in stop:
                    text = text.split(s)[0]
                out.append(text.rstrip())
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def generate_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                       *, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 8, check: Callable[[], None] | None = None) -> list[list[int]]:
    """One sampled response per prompt (token ids), as ids: cut after the first EOS (the EOS kept), no padding; a
    response with no token is ``[eos]``.

    Prompts are left-padded and sampled in batches of ``batch_size`` with ``model.generate`` and its KV cache; batch
    ``start`` (the index of its first prompt) draws from torch seed ``seed + start`` under a forked RNG, so the result
    depends on ``seed`` and the batch layout alone and the global RNG state is untouched. ``check`` is called before
    every batch and after every generated token (an exception it raises ends the call); the model is back in its
    mode afterwards.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    criteria = StoppingCriteriaList([_Check(check)]) if check is not None else None
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            if check is not None:
                check()
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(list(p)), 1
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + start)
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                           top_p=top_p, top_k=None, pad_token_id=pad, eos_token_id=eos,
                                           stopping_criteria=criteria)
            for row in generated[:, width:].tolist():  # (len(chunk), new tokens); padding only follows an EOS
                cut = row[: row.index(eos) + 1] if eos in row else row
                out.append(cut or [eos])
    finally:
        model.train(was_training)
    return out
