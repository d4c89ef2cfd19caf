"""Forward passes that do only the work the numbers need: the vocabulary projection runs on response positions only,
rows are grouped by length so padding stays bounded, and a prompt shared by several responses (a DPO pair, a probe
row) runs once, its KV cache serving all of them."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from dynlab.losses.logps import IGNORE_INDEX, response_positions

Member = tuple[int, str]  # (row, response name)


def response_hidden(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                    labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states that predict response tokens.

    input_ids, attention_mask, labels (B, T) -> hidden (N, H), targets (N,), seq_index (N,)
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    batch_idx, pos_idx, targets = response_positions(labels)
    return hidden[batch_idx, pos_idx], targets, batch_idx


def grouped_response_hidden(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                            max_padding: float = 0.25) -> tuple[Tensor, Tensor, Tensor]:
    """``response_hidden`` with the rows of a right-padded batch grouped by length, one forward per group trimmed to
    its own width: the same values (differentiable), in group order, for less padding.

    input_ids, attention_mask, labels (B, T) -> hidden (N, H), targets (N,), seq_index (N,) into the B rows
    """
    lengths = attention_mask.sum(dim=1).tolist()
    groups = length_groups(lengths, max_padding, max_tokens=sum(lengths) + 1)
    if len(groups) == 1:
        return response_hidden(model, input_ids, attention_mask, labels)
    parts = []
    for group in groups:
        rows, width = torch.tensor(group, device=input_ids.device), max(lengths[i] for i in group)
        hidden, targets, seq_index = response_hidden(model, input_ids[rows, :width], attention_mask[rows, :width],
                                                     labels[rows, :width])
        parts.append((hidden, targets, rows[seq_index]))
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def lm_head(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    """The vocabulary projection: hidden (N, H) -> logits (N, V)."""
    return model.get_output_embeddings()(hidden)


def length_groups(lengths: Sequence[int], max_padding: float = 0.25, max_tokens: int = 4096,
                  context: Sequence[int] | None = None) -> list[list[int]]:
    """Indices grouped by length so each padded group wastes at most ``max_padding`` of its real tokens.

    Sorted by length; a group is closed when adding the next item would pad more than that, or exceed
    ``max_tokens`` padded tokens (bounding the (group, T, V) work a group can cause). ``context`` (per item, e.g. the
    prompt a response attends to through a KV cache) counts into that bound as ``group x (width + max context)``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = ctx = 0
    for i in order:
        width = lengths[i]  # sorted, so the newest item is the longest
        longest_ctx = max(ctx, context[i]) if context is not None else 0
        padded = width * (len(current) + 1)
        if current and (padded - (real + width) > max_padding * (real + width)
                        or (width + longest_ctx) * (len(current) + 1) > max_tokens):
            groups.append(current)
            current, real = [], 0
            longest_ctx = context[i] if context is not None else 0
        current.append(i)
        real += width
        ctx = longest_ctx
    if current:
        groups.append(current)
    return groups


def shares_kv_cache(model: PreTrainedModel) -> bool:
    """Whether the model's KV cache simply concatenates keys per layer (no sliding window), so that prompt caches can
    be stacked across rows and extended by any response."""
    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def pair_rows(input_ids: Tensor, attention_mask: Tensor,
              labels: Tensor) -> tuple[list[Tensor], list[dict[str, Tensor]]] | None:
    """A right-padded DPO batch (rows ``[:B]`` chosen, ``[B:]`` rejected) as probe-style rows: pair k's prompt and
    ``{"chosen", "rejected"}`` responses. ``None`` unless both rows of every pair hold the same prompt (the tokens
    before the first label) and every response token is labelled.
    """
    if input_ids.shape[0] % 2:
        return None
    half, width = input_ids.shape[0] // 2, input_ids.shape[1]
    labelled = labels != IGNORE_INDEX
    start = torch.where(labelled.any(dim=1), labelled.int().argmax(dim=1), width)  # (2B,) prompt lengths
    ends = attention_mask.sum(dim=1)
    position = torch.arange(width, device=input_ids.device)
    in_prompt = position < start[:half, None]
    in_response = (position >= start[:, None]) & (position < ends[:, None])
    if not (torch.equal(start[:half], start[half:]) and bool((start < ends).all())
            and torch.equal(input_ids[:half] * in_prompt, input_ids[half:] * in_prompt)
            and torch.equal(torch.where(in_response, labels, input_ids), input_ids)
            and torch.equal(labelled, in_response)):
        return None
    start, ends = start.tolist(), ends.tolist()
    prompts = [input_ids[k, : start[k]] for k in range(half)]
    responses = [{"chosen": input_ids[k, start[k]: ends[k]], "rejected": input_ids[half + k, start[k]: ends[half + k]]}
                 for k in range(half)]
    return prompts, responses


def _right_pad(seqs: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """[(L_i,)] -> ids (R, W) zero-padded on the right, mask (R, W)."""
    width = max(s.numel() for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for j, s in enumerate(seqs):
        ids[j, : s.numel()], mask[j, : s.numel()] = s, 1
    return ids, mask


@torch.no_grad()
def shared_prompt_hidden(model: PreTrainedModel, prompt_ids: Tensor, responses: Mapping[str, Tensor],
                         max_padding: float = 0.25) -> Iterator[tuple[list[str], Tensor, Tensor, Tensor]]:
    """Score many responses to one prompt: the prompt runs once, its KV cache serves every response group.

    prompt_ids (P,), responses {name: (L_name,)} -> yields per length group
    (names, hidden (N, H), targets (N,), seq_index (N,) into names).
    """
    for members, hidden, targets, seq_index in shared_prompt_hidden_rows(model, [prompt_ids], [responses],
                                                                         max_padding):
        yield [name for _, name in members], hidden, targets, seq_index


def shared_prompt_hidden_rows(model: PreTrainedModel, prompts: Sequence[Tensor],
                              responses: Sequence[Mapping[str, Tensor]], max_padding: float = 0.25,
                              max_tokens: int = 4096) -> Iterator[tuple[list[Member], Tensor, Tensor, Tensor]]:
    """The responses of many rows, each row's prompt run once: prompts are grouped by length, then every row's
    responses are grouped by length across rows, each member seeing its own row's prompt cache. Differentiable
    (DPO pairs train through it) for models whose cache ``shares_kv_cache``; sliding-window models take a row-by-row
    path under ``no_grad``, for probe scoring only (``DPOModule`` does not use this function for them).

    prompts [(P_k,)], responses [{name: (L,)}] (one dict per row) -> yields per response group
    (members [(row k, name)], hidden (N, H), targets (N,), seq_index (N,) into members). Every response token is a
    target; token j is predicted by the state before it (the prompt's last state for j = 0).
    """
    if not prompts:
        return
    if not shares_kv_cache(model):  # sliding-window caches: row by row, each prompt's cache repeated per group
        yield from rows_one_by_one(model, prompts, responses, max_padding)
        return
    backbone, device = model.base_model, prompts[0].device
    prompt_len = [p.numel() for p in prompts]
    last_hidden: list[Tensor] = [prompts[0].new_empty(0)] * len(prompts)  # (H,) per row
    kv: list[list[tuple[Tensor, Tensor]]] = [[] for _ in prompts]  # per row, per layer: (heads, P_k, d)
    for group in length_groups(prompt_len, max_padding, max_tokens):
        # right-padded: a real token never attends to the padding after it
        ids, mask = _right_pad([prompts[k] for k in group], device)
        out = backbone(input_ids=ids, attention_mask=mask, use_cache=True)
        for j, k in enumerate(group):
            n = prompt_len[k]
            last_hidden[k] = out.last_hidden_state[j, n - 1]
            kv[k] = [(layer.keys[j, :, :n], layer.values[j, :, :n]) for layer in out.past_key_values.layers]
    items = [(k, name) for k, row in enumerate(responses) for name in row]
    lengths = [responses[k][name].numel() for k, name in items]
    for group in length_groups(lengths, max_padding, max_tokens, context=[prompt_len[k] for k, _ in items]):
        members = [items[i] for i in group]
        rows = [k for k, _ in members]
        ids, mask = _right_pad([responses[k][name] for k, name in members], device)
        width = ids.shape[1]
        p = max(prompt_len[k] for k in rows)
        start = torch.tensor([prompt_len[k] for k in rows], device=device)
        prompt_mask = (torch.arange(p, device=device) < start[:, None]).long()  # (R, P)
        out = backbone(input_ids=ids, attention_mask=torch.cat([prompt_mask, mask], dim=1),
                       position_ids=start[:, None] + torch.arange(width, device=device),
                       past_key_values=_stacked_cache(kv, rows, prompt_len, p), use_cache=True)
        first = torch.stack([last_hidden[k] for k in rows])[:, None]  # (R, 1, H)
        states = torch.cat([first, out.last_hidden_state[:, :-1]], dim=1)  # (R, W, H)
        seq_index, pos = mask.nonzero(as_tuple=True)
        yield members, states[seq_index, pos], ids[seq_index, pos], seq_index


def backbone_forward_count(model: PreTrainedModel, prompts: Sequence[Tensor],
                           responses: Sequence[Mapping[str, Tensor]], max_padding: float = 0.25,
                           max_tokens: int = 4096) -> int:
    """How many backbone forwards :func:`shared_prompt_hidden_rows` makes for these rows, from their lengths alone
    (no forward runs): one per prompt group plus one per response group, or, on the row-by-row path
    (:func:`rows_one_by_one`), per row one for its prompt plus one per group of its responses.

    Under FSDP every backbone forward all-gathers each wrapped layer's weights, a collective: ranks scoring different
    rows pad to the largest count with :func:`dummy_backbone_forward` (``CausalLMModule`` does, for probe evaluation).
    """
    if not prompts:
        return 0
    if not shares_kv_cache(model):
        return sum(1 + len(length_groups([r.numel() for r in row.values()], max_padding)) for row in responses)
    prompt_len = [p.numel() for p in prompts]
    items = [(k, name) for k, row in enumerate(responses) for name in row]
    lengths = [responses[k][name].numel() for k, name in items]
    return (len(length_groups(prompt_len, max_padding, max_tokens))
            + len(length_groups(lengths, max_padding, max_tokens, context=[prompt_len[k] for k, _ in items])))


@torch.no_grad()
def dummy_backbone_forward(model: PreTrainedModel, device: torch.device) -> None:
    """One backbone forward of a single token whose result is dropped: under FSDP it takes part in every wrapped
    layer's all-gather exactly as a real forward does, so a rank with fewer rows to score keeps in step."""
    model.base_model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)


def _stacked_cache(kv: Sequence[Sequence[tuple[Tensor, Tensor]]], rows: Sequence[int], prompt_len: Sequence[int],
                   width: int) -> DynamicCache:
    """The prompt keys and values of ``rows``, each right-padded to ``width``: (R, heads, width, d) per layer."""
    def stacked(layer: int, which: int) -> Tensor:
        return torch.stack([torch.nn.functional.pad(kv[k][layer][which], (0, 0, 0, width - prompt_len[k]))
                            for k in rows])

    return DynamicCache([(stacked(layer, 0), stacked(layer, 1)) for layer in range(len(kv[rows[0]]))])


@torch.no_grad()
def rows_one_by_one(model: PreTrainedModel, prompts: Sequence[Tensor], responses: Sequence[Mapping[str, Tensor]],
                    max_padding: float = 0.25) -> Iterator[tuple[list[Member], Tensor, Tensor, Tensor]]:
    """:func:`shared_prompt_hidden_rows` one row at a time (each prompt's cache copied for each of its response
    groups), under ``no_grad``: the path for sliding-window caches, and the slower reference the batched path is
    measured against (``benchmarks/before_after.py``). Same arguments and yields, without ``max_tokens``.
    """
    backbone = model.base_model
    for k, (prompt_ids, row) in enumerate(zip(prompts, responses)):
        prompt_out = backbone(input_ids=prompt_ids[None], use_cache=True)
        prompt_cache, last_prompt_hidden = prompt_out.past_key_values, prompt_out.last_hidden_state[:, -1]  # (1, H)
        p = prompt_ids.numel()
        names = list(row)
        for group in length_groups([row[n].numel() for n in names], max_padding):
            ids, mask = _right_pad([row[names[i]] for i in group], prompt_ids.device)
            r, width = ids.shape
            cache = copy.deepcopy(prompt_cache)
            cache.batch_repeat_interleave(r)
            out = backbone(input_ids=ids, attention_mask=torch.cat([mask.new_ones(r, p), mask], dim=1),
                           position_ids=torch.arange(p, p + width, device=ids.device).expand(r, width),
                           past_key_values=cache, use_cache=True)
            states = torch.cat([last_prompt_hidden.expand(r, 1, -1), out.last_hidden_state[:, :-1]], dim=1)
            seq_index, pos = mask.nonzero(as_tuple=True)
            yield [(k, names[i]) for i in group], states[seq_index, pos], ids[seq_index, pos], seq_index
