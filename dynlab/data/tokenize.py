"""Prompt/response tokenization, label masking, the truncation policy and the collate functions.

Truncation policy (the paper's, made explicit): a row's prompt is tokenized once and shared by all its responses
(chosen, rejected, every probe type). If the prompt plus the row's LONGEST response (EOS included) exceeds
``max_length``, the prompt is cut to its last ``max_prompt_length`` tokens (the end of a dialogue is what the
response answers). A response that still does not fit is an error naming the file, row and field
(``response_truncation="error"``, the default) or is cut to fit, keeping its start and losing its EOS
(``"keep_start"``, what the paper's code did).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from dynlab.errors import InputError
from dynlab.losses.logps import IGNORE_INDEX

ResponseTruncation = Literal["error", "keep_start"]


def encode_row(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    responses: Mapping[str, str],
    *,
    max_length: int,
    max_prompt_length: int,
    response_truncation: ResponseTruncation = "error",
    file: str | None = None,
    row: int | None = None,
) -> tuple[list[int], dict[str, list[int]]]:
    """Token ids of one row's prompt and of each response (EOS appended), truncated by the module's policy."""
    if not 0 < max_prompt_length < max_length:
        raise InputError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})",
                         field="data.max_prompt_length")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    encoded = {name: tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for name, text in responses.items()}
    longest = max(len(ids) for ids in encoded.values())
    if len(prompt_ids) + longest > max_length:
        prompt_ids = keep_prompt_end(tokenizer, prompt_ids, max_prompt_length)
    room = max_length - len(prompt_ids)
    for name, ids in encoded.items():
        if len(ids) > room:
            if response_truncation == "error":
                raise InputError(
                    f"prompt ({len(prompt_ids)} tokens after cutting) + response ({len(ids)} tokens with EOS) "
                    f"exceeds max_length={max_length}; raise data.max_length or set "
                    f"data.response_truncation=keep_start", file=file, row=row, field=name)
            encoded[name] = ids[:room]
    return prompt_ids, encoded


def keep_prompt_end(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], max_prompt_length: int) -> list[int]:
    """The last ``max_prompt_length`` prompt tokens (the end of a dialogue is what a response answers), keeping a
    BOS the tokenizer put first."""
    if len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    bos = tokenizer.bos_token_id
    if bos is not None and prompt_ids[0] == bos:
        return [bos, *prompt_ids[len(prompt_ids) - max_prompt_length + 1:]]
    return prompt_ids[-max_prompt_length:]


def collate_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding), each (B, T)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    batch, width = len(lengths), max(lengths)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor([*p, *r])
        labels[i, len(p):n] = torch.tensor(r)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SFTCollator:
    """Examples ``{"index", "prompt_ids", "response_ids"}`` -> one padded batch with ``index`` (B,)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = collate_sequences([e["prompt_ids"] for e in examples], [e["response_ids"] for e in examples],
                                  self.pad_token_id)
        batch["index"] = torch.tensor([e["index"] for e in examples])
        return batch


class DPOCollator(SFTCollator):
    """Pairs ``{"index", "prompt_ids", "chosen_ids", "rejected_ids"}`` -> chosen stacked on rejected, (2B, T),
    for one concatenated forward: rows ``[:B]`` are chosen, ``[B:]`` rejected."""

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples]
        batch = collate_sequences(prompts + prompts, [e["chosen_ids"] for e in examples]
                                  + [e["rejected_ids"] for e in examples], self.pad_token_id)
        batch["index"] = torch.tensor([e["index"] for e in examples])
        return batch


def collate_probes(rows: Sequence[dict]) -> dict:
    """Probe rows ``{"index", "prompt_ids", "responses": {type: ids}}`` -> tensors, unpadded: the scorer groups
    responses by length itself and computes each prompt once."""
    return {
        "index": torch.tensor([r["index"] for r in rows]),
        "prompt_ids": [torch.tensor(r["prompt_ids"]) for r in rows],
        "responses": [{name: torch.tensor(ids) for name, ids in r["responses"].items()} for r in rows],
    }
