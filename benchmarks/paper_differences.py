"""The measured size of each deliberate difference from the paper's code (docs/differences.md), on the paper's HH
probe rows (``../shared/data/hh_probe/probe_test.jsonl``) with SmolLM2-135M-Instruct.

    python -m benchmarks.paper_differences [--rows 32] [--model smollm2]

- truncation: dynlab's rule (prompt cut when prompt + the longest SCORED response exceeds max_length) against the
  original ``tokenize_batch_element`` (the longest of every key in the row, ``chosen_selfr`` and the prompt itself
  included), on all 500 rows: how many rows keep a different prompt, and why.
- special tokens: tokens ``add_special_tokens=True`` adds to a prompt (the original code tokenized with False).
- a_norm: dynlab's mean of per-token ||A_m||_F against the paper's A_o (``a_norm: paper``), per probe type, on the
  first ``--rows`` rows, model forward in float32.
- except_argmax: dynlab's float32 logsumexp off the argmax against log1p(-max pi) in float64, and the original
  formula (NaN).
- sft reduction: N_tokens / B, the factor between ``token_mean`` and the paper's ``sequence_sum``, over batches of 4
  chosen responses.
- ipo: response lengths, the factor between the original IPO (summed log-probs) and TRL's (length-normalised).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections.abc import Sequence

import torch

from benchmarks.common import HH_PROBE_FILE, add_common_args, machine_info, model_spec, setup_torch, write_result
from dynlab.data.formats import PROBE_FILE_TYPES
from dynlab.data.tokenize import encode_row
from dynlab.metrics import sequence_stats, token_stats
from dynlab.models.forward import lm_head, shared_prompt_hidden_rows
from dynlab.models.load import load_model, load_tokenizer

MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256


def raw_rows() -> list[dict]:
    """The probe file as the original code reads it: every key, ``chosen_selfr`` included."""
    with open(HH_PROBE_FILE) as f:
        return [json.loads(line) for line in f]


def paper_prompt_length(tokenizer, row: dict, count_prompt: bool = True) -> int:
    """Prompt tokens the original ``tokenize_batch_element`` keeps (HH: keep_end): it cuts the prompt to its last
    max_prompt_length tokens when the prompt plus the longest of ALL the row's token lists exceeds max_length, the
    prompt itself among those lists (``count_prompt=False`` leaves it out, to isolate that quirk)."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    lengths = [len(tokenizer(v, add_special_tokens=False)["input_ids"]) + 1 for k, v in row.items() if k != "prompt"]
    longest = max(lengths + [len(prompt)] * count_prompt)
    return min(len(prompt), MAX_PROMPT_LENGTH) if len(prompt) + longest > MAX_LENGTH else len(prompt)


def truncation(tokenizer, rows: Sequence[dict]) -> dict:
    """Rows whose prompt dynlab keeps longer than the original code, for the probe rows (12 scored types) and for
    the training view of the same rows (prompt, chosen, rejected), with each cause alone."""
    special = len(tokenizer("x", add_special_tokens=True)["input_ids"]) - len(
        tokenizer("x", add_special_tokens=False)["input_ids"])
    out: dict = {"rows": len(rows), "special_tokens_added_to_a_prompt": special}
    for view, keys in (("probe", PROBE_FILE_TYPES), ("training", ("chosen", "rejected"))):
        full, selfr, prompt_quirk, indices = 0, 0, 0, []
        for i, row in enumerate(rows):
            ours, _ = encode_row(tokenizer, row["prompt"], {t: row[t] for t in keys}, max_length=MAX_LENGTH,
                                 max_prompt_length=MAX_PROMPT_LENGTH, response_truncation="keep_start")
            ours_len = len(ours) - special
            scored = {k: row[k] for k in ("prompt", *keys)}
            paper_row = {**scored, "chosen_selfr": row["chosen_selfr"]} if view == "probe" else scored
            if paper_prompt_length(tokenizer, paper_row) != ours_len:
                full += 1
                indices.append(i)
            selfr += paper_prompt_length(tokenizer, paper_row, count_prompt=False) != ours_len
            prompt_quirk += paper_prompt_length(tokenizer, scored) != ours_len
        out[view] = {"rows_keeping_a_longer_prompt": full, "from_chosen_selfr_alone": selfr,
                     "from_counting_the_prompt_alone": prompt_quirk, "row_indices": indices}
    return out


@torch.no_grad()
def probe_numbers(model, tokenizer, rows: Sequence[dict]) -> dict:
    """Per type: mean relative excess of a_norm over the paper's A_o; except_argmax against float64."""
    vocab = model.get_output_embeddings().weight.shape[0]
    excess: dict[str, list[float]] = {t: [] for t in PROBE_FILE_TYPES}
    except_err, tokens = 0.0, 0
    for row in rows:
        prompt, enc = encode_row(tokenizer, row["prompt"], {t: row[t] for t in PROBE_FILE_TYPES}, max_length=MAX_LENGTH,
                                 max_prompt_length=MAX_PROMPT_LENGTH, response_truncation="keep_start")
        responses = [{t: torch.tensor(ids) for t, ids in enc.items()}]
        for members, hidden, targets, seq_index in shared_prompt_hidden_rows(model, [torch.tensor(prompt)], responses):
            logits = lm_head(model, hidden)
            tok = token_stats(logits, targets)
            ours = sequence_stats(tok, seq_index, len(members))
            paper = sequence_stats(tok, seq_index, len(members), a_norm="paper", vocab_size=vocab)
            for j, (_, name) in enumerate(members):
                excess[name].append(ours["a_norm"][j].item() / paper["a_norm"][j].item() - 1)
            max_prob = logits.double().softmax(-1).max(-1).values
            want = torch.log1p(-max_prob)
            except_err = max(except_err, ((tok["except_argmax_logp"].double() - want).abs() / want.abs()).max().item())
            tokens += targets.numel()
    return {"a_norm_over_paper_A_o_percent": {t: {"mean": 100 * statistics.mean(v), "min": 100 * min(v),
                                                  "max": 100 * max(v)} for t, v in excess.items() if v},
            "except_argmax_max_relative_error_vs_float64": except_err, "tokens": tokens,
            # the original sums log(1 * mask - p_max * mask + 1e-100) * mask over every position: at a prompt
            # position that is log(0 + 1e-100) * 0, and 1e-100 is 0 in float32, so every row's sum is NaN
            "paper_except_argmax_at_a_masked_position": float(torch.log(torch.zeros(1) + 1e-100) * 0)}


@torch.no_grad()
def fp16_reference(model, tokenizer, rows: Sequence[dict]) -> dict:
    """The DPO logit h at step 0 when the reference is a float16 copy of the float32 policy (the original code's
    ``reference_dtype: float16``); dynlab's float32 reference gives h = 0 exactly."""
    import copy

    reference = copy.deepcopy(model).half()

    def logp(m, prompt: list[int], response: list[int]) -> float:
        ids = torch.tensor([prompt + response])
        logits = m(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
        logpi = logits - logits.logsumexp(-1, keepdim=True)
        return logpi.gather(1, torch.tensor(response)[:, None]).sum().item()

    hs = []
    for row in rows:
        prompt, enc = encode_row(tokenizer, row["prompt"], {t: row[t] for t in ("chosen", "rejected")},
                                 max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                                 response_truncation="keep_start")
        h = (logp(model, prompt, enc["chosen"]) - logp(model, prompt, enc["rejected"])) - (
            logp(reference, prompt, enc["chosen"]) - logp(reference, prompt, enc["rejected"]))
        hs.append(abs(h))
    return {"pairs": len(rows), "mean_abs_h": statistics.mean(hs), "max_abs_h": max(hs),
            "mean_abs_loss_minus_log2_at_beta_0.1": statistics.mean(abs(math.log1p(math.exp(-0.1 * h)) - math.log(2))
                                                                  for h in hs)}


def sft_factor(tokenizer, rows: Sequence[dict], batch_size: int = 4, draws: int = 2000) -> dict:
    """N_tokens / B over random batches of ``batch_size`` chosen responses (EOS included): sequence_sum equals
    token_mean times this factor."""
    lengths = [len(tokenizer(r["chosen"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    gen = random.Random(0)
    factors = sorted(sum(gen.sample(lengths, batch_size)) / batch_size for _ in range(draws))
    return {"mean": statistics.mean(factors), "p05": factors[draws // 20], "p95": factors[-draws // 20],
            "min": factors[0], "max": factors[-1]}


def ipo_lengths(tokenizer, rows: Sequence[dict]) -> dict:
    n = {k: [len(tokenizer(r[k], add_special_tokens=False)["input_ids"]) + 1 for r in rows] for k in ("chosen",
                                                                                                   "rejected")}
    return {k: {"mean": statistics.mean(v), "median": statistics.median(v)} for k, v in n.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "llama20m"))
    parser.add_argument("--rows", type=int, default=32, help="probe rows scored for a_norm and except_argmax")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = 2
    setup_torch(args)
    spec = model_spec(args.model)
    tokenizer = load_tokenizer(spec)
    rows = raw_rows()
    model = load_model(spec).to(args.device).eval()
    result = {"benchmark": "paper_differences", "machine": machine_info(args),
              "settings": {"model": args.model, "rows_scored": args.rows, "max_length": MAX_LENGTH,
                           "max_prompt_length": MAX_PROMPT_LENGTH},
              "truncation": truncation(tokenizer, rows),
              "probe": probe_numbers(model, tokenizer, rows[: args.rows]),
              "sft_token_mean_to_sequence_sum_factor": sft_factor(tokenizer, rows),
              "response_tokens": ipo_lengths(tokenizer, rows),
              "fp16_reference": fp16_reference(model, tokenizer, rows[: min(args.rows, 8)])}
    a = result["probe"]["a_norm_over_paper_A_o_percent"]
    means = [v["mean"] for v in a.values()]
    result["summary"] = {"a_norm_over_A_o_percent_type_means": [min(means), max(means)],
                         "rows_keeping_a_longer_prompt": {v: {k: x for k, x in result["truncation"][v].items()
                                                              if k != "row_indices"} for v in ("probe", "training")}}
    print(json.dumps(result["summary"]), flush=True)
    write_result(args.out, "paper_differences", result)
    return result


if __name__ == "__main__":
    main()
