"""Probe evaluation: the paper's method against dynlab's, on the same probes, the same model and the same numbers.

    python -m benchmarks.probe_vs_paper [--rows 8] [--repeats 2] [--quick] [--device cuda --dtype bf16]

The paper's method, re-implemented faithfully (``paper_probe_stats``): batch size 1, one forward per (prompt,
response type) of the whole prompt + response, the full float32 softmax materialised over every position, metrics
read off the response positions. dynlab's: ``CausalLMModule.probe_step`` (each prompt once, its KV cache shared by
the row's responses grouped by length, the vocabulary projection only on response positions, in chunks). Both give
dynlab's metric definitions (``DESIGN.md``), so every per-example number is compared.

Data: the first ``--rows`` rows of ``../shared/data/hh_probe/probe_test.jsonl`` with its 12 evaluated response types,
cut by the paper's policy (max length 512, prompt cut to 256, responses keep their start). The two methods alternate,
``--repeats`` times; the speed-up is the ratio of medians (min-max over the repeats' own ratios).

Hardware ceiling: the FLOPs of dynlab's method (``probe_flops``: every prompt once and every response token through
the transformer body, 2 x body parameters per token, and the vocabulary projection on response positions only,
2 x H x V per response token; attention's context-length term is left out, as the training benchmark's 6N leaves it
out) over its median time, as a fraction of the median FLOP/s of a large square matmul timed in the same run before
each repeat (``benchmarks.train_throughput.matmul_peak``). Target on a CPU: >= 0.8.

Peak memory, per probe row (dynlab's unit of work): dynlab's ``probe_step`` against a plain forward of the same
batch, ``model(input_ids, attention_mask)`` on the row's 12 prompt+response sequences right-padded (its logits
included), and the paper's method on the same row; measured on the longest rows of the subset.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import (
    add_common_args,
    hh_rows,
    machine_info,
    model_spec,
    peak_memory_mb,
    setup_torch,
    summary,
    timed,
    verdict,
    write_result,
)
from dynlab.data.formats import PROBE_FILE_TYPES

METRICS = ("logp", "argmax_logp", "except_argmax_logp", "max_prob", "peakiness", "entropy", "a_norm", "p_e", "energy")
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256  # the paper's probe tokenisation
TARGET_SPEEDUP = {"cpu": 2.0, "cuda": 10.0}
TARGET_MEMORY = 1.5  # dynlab's peak over a plain forward of the same batch
TARGET_AGREEMENT = 1e-5  # relative
TARGET_PEAK_FRACTION = {"cpu": 0.8}  # of the matmul peak; not set for CUDA (fp32 probes on bf16 tensor cores)
# float32 sums over hundreds of tokens differ by ~1e-6 relative between equally correct orders of summation; a
# number that is itself ~0 (the entropy of a near one-hot distribution) is compared at this absolute floor
ABS_FLOOR = 1e-6


# ---- the paper's method ---------------------------------------------------------------------------------------------
@torch.no_grad()
def paper_sequence_stats(model, prompt_ids: Tensor, response_ids: Tensor) -> dict[str, float]:
    """One (prompt, response) the paper's way: batch 1, the whole sequence, the full softmax materialised.

    prompt_ids (P,), response_ids (R,) -> {metric: value} with dynlab's definitions.
    """
    ids = torch.cat([prompt_ids, response_ids])[None]  # (1, T)
    logits = model(input_ids=ids).logits.float()[:, :-1]  # (1, T-1, V): every position, as the paper's code
    labels = ids[:, 1:].clone()
    labels[:, : prompt_ids.numel() - 1] = -100
    mask = labels != -100
    # z - logsumexp(z) as dynlab's token_stats: CPU log_softmax (torch 2.13) is 1.9e-5 off over a 49k vocabulary
    logprobs = logits - logits.logsumexp(-1, keepdim=True)  # (1, T-1, V)
    probs = logprobs.exp()  # (1, T-1, V)
    vocab = logits.shape[-1]
    y = labels.clamp(min=0)[..., None]
    token_logp = logprobs.gather(-1, y).squeeze(-1)  # (1, T-1)
    max_logp, argmax = logprobs.max(-1)  # (1, T-1)
    sq_norm = (probs * probs).sum(-1)  # ||pi||^2
    one_hot = torch.nn.functional.one_hot(labels.clamp(min=0), vocab).float()  # (1, T-1, V), as the paper's code
    p_e = (probs - one_hot).norm(dim=-1)
    entropy = -(probs * logprobs).sum(-1)
    # log(1 - max pi) as the log of the mass off the argmax (the paper's log(1 - p + 1e-100) underflows to NaN)
    except_argmax = logprobs.scatter(-1, argmax[..., None], float("-inf")).logsumexp(-1)
    per_token = {"logp": token_logp, "argmax_logp": max_logp, "except_argmax_logp": except_argmax,
                 "max_prob": max_logp.exp(), "peakiness": sq_norm, "entropy": entropy,
                 "a_norm": (vocab - 2 + vocab * sq_norm).sqrt(), "p_e": p_e, "energy": 1 - token_logp.exp()}
    n = mask.sum()
    out = {}
    for name, values in per_token.items():
        total = (values * mask).sum()
        out[name] = float(total if name in ("logp", "argmax_logp", "except_argmax_logp") else total / n)
    return out


def paper_probe_stats(model, prompt_ids: Tensor, responses: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """Every response type of one probe row, one forward each: {type: {metric: value}}."""
    return {name: paper_sequence_stats(model, prompt_ids, ids) for name, ids in responses.items()}


# ---- dynlab's method ------------------------------------------------------------------------------------------------
def probe_module(spec, device: str, dtype: torch.dtype):
    """An SFTModule (probe scoring lives in the shared base) in eval mode on ``device``."""
    from dynlab.modules import SFTModule

    module = SFTModule(policy=spec).to(device)
    module.policy.to(dtype).eval()
    return module


def encode_probe_rows(tokenizer, rows: Sequence[dict], types: Sequence[str]) -> list[dict]:
    """``{"index", "prompt_ids", "responses": {type: ids}}`` by dynlab's tokenisation and the paper's cut."""
    from dynlab.data.tokenize import encode_row

    out = []
    for i, row in enumerate(rows):
        prompt, enc = encode_row(tokenizer, row["prompt"], {t: row[t] for t in types}, max_length=MAX_LENGTH,
                                 max_prompt_length=MAX_PROMPT_LENGTH, response_truncation="keep_start")
        out.append({"index": i, "prompt_ids": prompt, "responses": enc})
    return out


def init_probe_state(module, examples: Sequence[dict], types: Sequence[str]) -> None:
    """The module's probe metrics and baselines for one probe split, ``test``, of ``examples``."""
    module.init_probe_state(SimpleNamespace(probe_types={"test": list(types)}, probe_examples={"test": examples}))


def dynlab_probe_stats(module, examples: Sequence[dict], device: str,
                       batch_size: int = 4) -> dict[int, dict[str, dict[str, float]]]:
    """dynlab's probe evaluation of ``examples`` (after ``init_probe_state``): {row: {type: {metric: value}}}."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from dynlab.data.tokenize import collate_probes

    out: dict[int, dict[str, dict[str, float]]] = {}
    for s in range(0, len(examples), batch_size):
        batch = move_data_to_device(collate_probes(examples[s: s + batch_size]), device)
        for name, values in module.probe_step("test", batch).items():
            for j, row in enumerate(values["row"].tolist()):
                out.setdefault(row, {})[name] = {m: float(values[m][j]) for m in METRICS}
    module.compute_probe_metrics()  # resets the accumulators
    return out


def probe_flops(model, examples: Sequence[dict]) -> dict[str, float]:
    """FLOPs of dynlab's probe evaluation of ``examples``: 2 x (parameters - input embedding) per prompt token (once
    per row) and per response token, plus 2 x H x V per response token for the vocabulary projection."""
    embedding = model.get_input_embeddings().weight
    vocab, hidden = embedding.shape
    body = sum(p.numel() for p in model.parameters()) - embedding.numel()
    head = model.get_output_embeddings().weight
    if head.data_ptr() != embedding.data_ptr():  # untied: the head is not part of the body either
        body -= head.numel()
    prompt = sum(len(e["prompt_ids"]) for e in examples)
    response = sum(len(r) for e in examples for r in e["responses"].values())
    return {"body": 2.0 * body * (prompt + response), "vocabulary_projection": 2.0 * hidden * vocab * response,
            "total": 2.0 * body * (prompt + response) + 2.0 * hidden * vocab * response}


def paper_all(model, examples: Sequence[dict], device: str) -> dict[int, dict[str, dict[str, float]]]:
    return {e["index"]: paper_probe_stats(model, torch.tensor(e["prompt_ids"], device=device),
                                          {k: torch.tensor(v, device=device) for k, v in e["responses"].items()})
            for e in examples}


def agreement(dynlab: Mapping, paper: Mapping) -> dict[str, Any]:
    """Largest relative difference per metric over every (row, type): |d - p| / max(|p|, ABS_FLOOR)."""
    worst: dict[str, float] = {}
    where: dict[str, Any] = {}
    for row, types in paper.items():
        for name, metrics in types.items():
            for m, p in metrics.items():
                d = dynlab[row][name][m]
                rel = abs(d - p) / max(abs(p), ABS_FLOOR)
                if rel >= worst.get(m, -1.0):
                    worst[m], where[m] = rel, {"row": row, "type": name, "paper": p, "dynlab": d}
    overall = max(worst.values())
    return {"max_relative_difference": worst, "worst_case": where, "overall": overall,
            **{k: v for k, v in verdict(overall, TARGET_AGREEMENT, False).items() if k != "value"}}


# ---- memory ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def plain_forward(model, example: dict, pad_id: int, device: str) -> Tensor:
    """A plain forward of the row's prompt+response sequences, right-padded, logits included (the naive batch)."""
    seqs = [example["prompt_ids"] + ids for ids in example["responses"].values()]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s, device=device), 1
    return model(input_ids=ids, attention_mask=mask).logits


def memory(module, examples: Sequence[dict], types: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    model, pad = module.policy, module.tokenizer.pad_token_id
    longest = sorted(examples, key=lambda e: -sum(len(e["prompt_ids"]) + len(r) for r in e["responses"].values()))
    per_row = []
    for e in longest[: args.memory_rows]:
        plain, _ = peak_memory_mb(lambda: plain_forward(model, e, pad, args.device), args.device)
        ours, _ = peak_memory_mb(lambda: dynlab_probe_stats(module, [e], args.device), args.device)
        paper, _ = peak_memory_mb(lambda: paper_all(model, [e], args.device), args.device)
        plain2, _ = peak_memory_mb(lambda: plain_forward(model, e, pad, args.device), args.device)
        per_row.append({"row": e["index"], "sequences": len(e["responses"]),
                        "tokens_padded": len(e["responses"]) * (len(e["prompt_ids"]) + max(
                            len(r) for r in e["responses"].values())),
                        "plain_forward_mb": max(plain, plain2), "dynlab_mb": ours, "paper_mb": paper,
                        "dynlab_over_plain": ours / max(plain, plain2)})
    ratios = [r["dynlab_over_plain"] for r in per_row]
    worst = max(ratios)
    return {"per_row": per_row, "dynlab_over_plain": summary(ratios),
            **{k: v for k, v in verdict(worst, TARGET_MEMORY, False).items() if k != "value"},
            "note": "target checked on the worst row; CPU figures are resident-set high-water growth"}


# ---- main -----------------------------------------------------------------------------------------------------------
def ceiling(flops: Mapping[str, float], seconds: Sequence[float], peaks: Sequence[float], kind: str) -> dict[str, Any]:
    """dynlab's achieved FLOP/s (median time) as a fraction of the median matmul peak of the same run."""
    achieved = flops["total"] / statistics.median(seconds)
    out = {"definition": "probe_flops over dynlab's median seconds, over the median FLOP/s of a large square matmul "
                         "timed before each repeat", "flops": dict(flops), "achieved_flops": achieved,
           "matmul_peak_flops": summary(peaks), "fraction": achieved / statistics.median(peaks),
           "per_repeat": [flops["total"] / t / p for t, p in zip(seconds, peaks)]}
    if kind in TARGET_PEAK_FRACTION:
        v = verdict(out["fraction"], TARGET_PEAK_FRACTION[kind], True)
        out.update(target=v["target"], **{"pass": v["pass"]})
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "llama20m"))
    parser.add_argument("--rows", type=int, default=8, help="probe rows (prompts) of the fixed subset")
    parser.add_argument("--start", type=int, default=0, help="first row of the probe file")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-rows", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats, args.memory_rows = 2, 2, 1
    setup_torch(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    module = probe_module(model_spec(args.model), args.device, dtype)
    types = list(PROBE_FILE_TYPES)
    examples = encode_probe_rows(module.tokenizer, hh_rows(start=args.start, limit=args.rows), types)
    init_probe_state(module, examples, types)

    from benchmarks.train_throughput import matmul_peak

    dynlab_times, paper_times, peaks = [], [], []
    ours = paper = None
    for r in range(args.repeats):
        peaks.append(matmul_peak(args)[args.dtype])
        order = ("paper", "dynlab") if r % 2 == 0 else ("dynlab", "paper")
        for method in order:
            if method == "paper":
                t, paper = timed(lambda: paper_all(module.policy, examples, args.device), args.device)
                paper_times.append(t)
            else:
                t, ours = timed(lambda: dynlab_probe_stats(module, examples, args.device), args.device)
                dynlab_times.append(t)
            print(f"  repeat {r} {method}: {t:.2f}s", flush=True)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    per_repeat = [p / d for p, d in zip(paper_times, dynlab_times)]
    speedup = statistics.median(paper_times) / statistics.median(dynlab_times)
    tokens = {"prompt": sum(len(e["prompt_ids"]) for e in examples),
              "response": sum(len(r) for e in examples for r in e["responses"].values())}
    result = {
        "benchmark": "probe_vs_paper", "machine": machine_info(args),
        "settings": {"model": args.model, "rows": args.rows, "start": args.start, "types": types,
                     "repeats": args.repeats, "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH,
                     "probe_chunk_tokens": module.hparams.probe_chunk_tokens, "tokens": tokens},
        "paper_seconds": summary(paper_times), "dynlab_seconds": summary(dynlab_times),
        "speedup": {"median": speedup, "min": min(per_repeat), "max": max(per_repeat), "per_repeat": per_repeat,
                    **{k: v for k, v in verdict(speedup, TARGET_SPEEDUP[kind], True).items() if k != "value"}},
        "hardware_ceiling": ceiling(probe_flops(module.policy, examples), dynlab_times, peaks, kind),
        "agreement": agreement(ours, paper),
        "memory": memory(module, examples, types, args),
    }
    if args.dtype == "bf16":
        result["agreement"]["note"] = "bf16 weights: agreement is reported, the 1e-5 target applies to fp32"
    write_result(args.out, "probe_vs_paper", result)
    return result


if __name__ == "__main__":
    main()
