"""Tokenization: prompt masking, EOS, the truncation policy and the collate functions."""

from __future__ import annotations

import pytest
import torch

from dynlab.data.tokenize import DPOCollator, SFTCollator, collate_sequences, encode_row
from dynlab.errors import InputError
from dynlab.losses.logps import IGNORE_INDEX
from dynlab.models.load import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _n(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_eos_appended_and_prompt_untouched_when_it_fits(tok):
    prompt_ids, enc = encode_row(tok, "\n\nHuman: hi\n\nAssistant:", {"chosen": " Hello there."},
                                 max_length=64, max_prompt_length=32)
    assert enc["chosen"][-1] == tok.eos_token_id
    assert len(enc["chosen"]) == _n(tok, " Hello there.") + 1
    assert prompt_ids == tok("\n\nHuman: hi\n\nAssistant:")["input_ids"]


def test_long_prompt_keeps_its_end_for_the_longest_response(tok):
    prompt = "\n\nHuman: " + "word " * 80 + "LAST\n\nAssistant:"
    full = tok(prompt)["input_ids"]
    prompt_ids, enc = encode_row(tok, prompt, {"chosen": " a b c", "rejected": " " + "x " * 20},
                                 max_length=80, max_prompt_length=20)
    assert prompt_ids == full[-20:]  # the end of the dialogue is kept
    assert len(prompt_ids) + max(len(v) for v in enc.values()) <= 80


def test_prompt_not_cut_when_the_row_fits(tok):
    prompt = "\n\nHuman: " + "word " * 10 + "\n\nAssistant:"
    prompt_ids, _ = encode_row(tok, prompt, {"chosen": " ok"}, max_length=200, max_prompt_length=4)
    assert prompt_ids == tok(prompt)["input_ids"]


def test_response_that_cannot_fit_is_an_error_naming_file_row_field(tok):
    with pytest.raises(InputError) as err:
        encode_row(tok, "\n\nHuman: q\n\nAssistant:", {"chosen": " ok", "rejected": " long" * 80},
                   max_length=40, max_prompt_length=10, file="data.jsonl", row=7)
    msg = str(err.value)
    assert msg.startswith("data.jsonl: row 7: field 'rejected':") and "max_length=40" in msg and "\n" not in msg


def test_keep_start_truncation_cuts_the_response(tok):
    _, enc = encode_row(tok, "\n\nHuman: q\n\nAssistant:", {"rejected": " long" * 80}, max_length=40,
                        max_prompt_length=10, response_truncation="keep_start")
    full = tok(" long" * 80, add_special_tokens=False)["input_ids"]
    assert enc["rejected"] == full[: len(enc["rejected"])] and tok.eos_token_id not in enc["rejected"]


def test_bad_lengths_are_an_error(tok):
    with pytest.raises(InputError, match="max_prompt_length"):
        encode_row(tok, "p", {"chosen": " c"}, max_length=10, max_prompt_length=10)


def test_collate_masks_prompt_and_padding():
    batch = collate_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    i = IGNORE_INDEX
    assert batch["labels"].tolist() == [[i, i, i, 5, 6], [i, 7, 8, 9, i]]


def test_sft_and_dpo_collators():
    ex = [{"index": 3, "prompt_ids": [1], "response_ids": [2], "chosen_ids": [5, 6], "rejected_ids": [7]},
          {"index": 9, "prompt_ids": [1, 1], "response_ids": [2, 2], "chosen_ids": [8], "rejected_ids": [9, 9, 9]}]
    sft = SFTCollator(0)(ex)
    assert sft["input_ids"].shape == (2, 4) and sft["index"].tolist() == [3, 9]
    dpo = DPOCollator(0)(ex)
    assert dpo["input_ids"].shape == (4, 5) and dpo["index"].tolist() == [3, 9]
    # rows [:B] are chosen, [B:] rejected, each with its own prompt
    assert dpo["input_ids"][0, :3].tolist() == [1, 5, 6] and dpo["input_ids"][3, :5].tolist() == [1, 1, 9, 9, 9]
    assert torch.equal(dpo["labels"][2, :2], torch.tensor([IGNORE_INDEX, 7]))


def test_cutting_a_prompt_keeps_the_tokenizers_bos(tok):
    class WithBos:  # a tokenizer that starts every prompt with BOS (Llama-style)
        bos_token_id, eos_token_id = 7, tok.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": [7, *ids] if add_special_tokens else ids}

    prompt = "\n\nHuman: " + "word " * 80 + "LAST\n\nAssistant:"
    prompt_ids, _ = encode_row(WithBos(), prompt, {"chosen": " ok"}, max_length=30, max_prompt_length=10)
    assert prompt_ids == [7, *tok(prompt, add_special_tokens=False)["input_ids"][-9:]]
