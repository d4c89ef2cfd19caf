"""Forward passes that do only the work the numbers need: the vocabulary projection runs on response positions only,
and probe scoring computes each prompt once and reuses its KV cache for all of the prompt's responses."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel

from dynlab.losses.logps import response_positions


def response_hidden(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                    labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states that predict response tokens.

    input_ids, attention_mask, labels (B, T) -> hidden (N, H), targets (N,), seq_index (N,)
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    batch_idx, pos_idx, targets = response_positions(labels)
    return hidden[batch_idx, pos_idx], targets, batch_idx


def lm_head(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    """The vocabulary projection: hidden (N, H) -> logits (N, V)."""
    return model.get_output_embeddings()(hidden)


def length_groups(lengths: Sequence[int], max_padding: float = 0.25, max_tokens: int = 4096) -> list[list[int]]:
    """Indices grouped by length so each padded group wastes at most ``max_padding`` of its real tokens.

    Sorted by length; a group is closed when adding the next item would pad more than that, or exceed
    ``max_tokens`` padded tokens (bounding the (group, T, V) work a group can cause).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        width = lengths[i]  # sorted, so the newest item is the longest
        padded = width * (len(current) + 1)
        if current and (padded - (real + width) > max_padding * (real + width) or padded > max_tokens):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups


@torch.no_grad()
def shared_prompt_hidden(model: PreTrainedModel, prompt_ids: Tensor, responses: Mapping[str, Tensor],
                         max_padding: float = 0.25) -> Iterator[tuple[list[str], Tensor, Tensor, Tensor]]:
    """Score many responses to one prompt: the prompt runs once, its KV cache serves every response group.

    prompt_ids (P,), responses {name: (L_name,)} -> yields per length group
    (names, hidden (N, H), targets (N,), seq_index (N,) into names).
    """
    backbone = model.base_model
    device = prompt_ids.device
    prompt_out = backbone(input_ids=prompt_ids[None], use_cache=True)
    prompt_cache, last_prompt_hidden = prompt_out.past_key_values, prompt_out.last_hidden_state[:, -1]  # (1, H)
    p = prompt_ids.numel()
    names = list(responses)
    for group in length_groups([responses[n].numel() for n in names], max_padding):
        group_names = [names[i] for i in group]
        seqs = [responses[n] for n in group_names]
        r, width = len(seqs), max(s.numel() for s in seqs)
        ids = torch.zeros((r, width), dtype=torch.long, device=device)
        mask = torch.zeros((r, width), dtype=torch.long, device=device)
        for j, s in enumerate(seqs):
            ids[j, : s.numel()], mask[j, : s.numel()] = s, 1
        cache = copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(r)
        out = backbone(input_ids=ids, attention_mask=torch.cat([mask.new_ones(r, p), mask], dim=1),
                       position_ids=torch.arange(p, p + width, device=device).expand(r, width),
                       past_key_values=cache, use_cache=True)
        # token j of a response is predicted by the state before it: the prompt's last state for j = 0
        states = torch.cat([last_prompt_hidden.expand(r, 1, -1), out.last_hidden_state[:, :-1]], dim=1)  # (R, W, H)
        seq_index, pos = mask.nonzero(as_tuple=True)
        yield group_names, states[seq_index, pos], ids[seq_index, pos], seq_index
