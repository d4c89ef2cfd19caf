"""Probe evaluation against the hardware: FLOP/s of ``probe_step`` as a fraction of the same run's matmul peak, on a
random-init model of a real architecture (SmolLM2-135M's shape by default) and random probe rows — no weights, no
tokenizer and no data files, so it runs on a bare GPU machine too.

    python -m benchmarks.probe_ceiling [--rows 16] [--types 12] [--repeats 3] [--quick] [--device cuda --dtype bf16]

Rows: ``--rows`` prompts of ``--prompt-length`` tokens, each with ``--types`` responses whose lengths are drawn
uniformly in [``--response-length`` / 2, ``--response-length``] (a fixed seed), scored by dynlab's probe evaluation
(``benchmarks.probe_vs_paper.dynlab_probe_stats``: every prompt once, responses grouped by length, the vocabulary
projection on response positions only). FLOPs as in ``benchmarks.probe_vs_paper.probe_flops``; the peak is a large
square matmul in the benchmark's dtype, timed before each repeat (``benchmarks.train_throughput.matmul_peak``).

With ``--dtype bf16`` the same rows are also scored with float32 weights and the largest difference of every probe
metric between the two is reported (probe statistics are always float32 from the logits; bf16 changes the logits).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch

from benchmarks.common import add_common_args, machine_info, setup_torch, summary, timed, write_result
from benchmarks.probe_vs_paper import METRICS, ceiling, dynlab_probe_stats, init_probe_state, probe_flops

# SmolLM2-135M-Instruct's architecture (its config.json), for a random-init model of the same shape and cost
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                     tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)


def random_rows(rows: int, types: int, prompt_length: int, response_length: int, vocab: int,
                seed: int = 0) -> list[dict]:
    """``rows`` probe examples ``{"index", "prompt_ids", "responses": {type_j: ids}}`` of random token ids."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        lengths = torch.randint(max(response_length // 2, 1), response_length + 1, (types,), generator=gen)
        out.append({"index": i, "prompt_ids": torch.randint(3, vocab, (prompt_length,), generator=gen).tolist(),
                    "responses": {f"type_{j}": torch.randint(3, vocab, (int(n),), generator=gen).tolist()
                                  for j, n in enumerate(lengths)}})
    return out


def build(shape: dict, device: str, dtype: torch.dtype):
    from dynlab.models.load import ModelSpec
    from dynlab.modules import SFTModule

    torch.manual_seed(0)  # the same random weights for every dtype
    module = SFTModule(policy=ModelSpec(name_or_path="tiny", tiny_config=shape)).to(device)
    module.policy.to(dtype).eval()
    return module


def largest_differences(a: dict, b: dict) -> dict[str, float]:
    """Per metric, the largest |a - b| over every (row, type)."""
    return {m: max(abs(a[r][t][m] - b[r][t][m]) for r in a for t in a[r]) for m in METRICS}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--types", type=int, default=12)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--response-length", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape's (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.types, args.repeats = 2, 4, 2
    setup_torch(args)
    shape = dict(SMOLLM2_SHAPE, **({"num_hidden_layers": args.layers} if args.layers else {}))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    module = build(shape, args.device, dtype)
    examples = random_rows(args.rows, args.types, args.prompt_length, args.response_length, shape["vocab_size"])
    types = list(examples[0]["responses"])
    init_probe_state(module, examples, types)
    from benchmarks.train_throughput import matmul_peak

    dynlab_probe_stats(module, examples[:1], args.device)  # warm-up (kernels, allocator)
    seconds, peaks, ours = [], [], None
    for r in range(args.repeats):
        peaks.append(matmul_peak(args)[args.dtype])
        t, ours = timed(lambda: dynlab_probe_stats(module, examples, args.device), args.device)
        seconds.append(t)
        print(f"  repeat {r}: {t:.3f}s, peak {peaks[-1] / 1e12:.2f} TFLOP/s", flush=True)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    result = {
        "benchmark": "probe_ceiling", "machine": machine_info(args),
        "settings": {"shape": shape, "rows": args.rows, "types": args.types, "prompt_length": args.prompt_length,
                     "response_length": args.response_length, "repeats": args.repeats,
                     "probe_chunk_tokens": module.hparams.probe_chunk_tokens},
        "seconds": summary(seconds),
        "response_tokens_per_s": sum(len(v) for e in examples for v in e["responses"].values())
        / statistics.median(seconds),
        "hardware_ceiling": ceiling(probe_flops(module.policy, examples), seconds, peaks, kind),
    }
    if dtype != torch.float32:
        del module
        reference = build(shape, args.device, torch.float32)
        init_probe_state(reference, examples, types)
        diffs = largest_differences(ours, dynlab_probe_stats(reference, examples, args.device))
        result["bf16_against_fp32"] = {"largest_absolute_difference": diffs,
                                       "finite": all(v == v and abs(v) != float("inf") for v in diffs.values())}
    write_result(args.out, "probe_ceiling", result)
    return result


if __name__ == "__main__":
    main()
