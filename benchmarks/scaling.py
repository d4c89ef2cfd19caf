"""Scaling: probe evaluation time against the number of probe prompts and of response types, and dynlab's DPO training
step time against sequence length; the exponents are least-squares slopes on log-log axes.

    python -m benchmarks.scaling [--quick] [--device cuda --dtype bf16]

Probe evaluation: dynlab's ``probe_step`` on the paper's HH probe rows (SmolLM2, the paper's 512/256 cut), for
``--prompts`` prompts with all 12 types, and for the first ``--types`` types with ``--fixed-prompts`` prompts. Training:
the real ``DPOModule`` step through Lightning (as in ``train_throughput``) on batches of ``--pairs`` pairs whose every
sequence is exactly L tokens (half prompt, half response, cut from the HH text), for L in ``--lengths``. Every
configuration is measured once per round, in an order that rotates; medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import (
    add_common_args,
    hh_rows,
    loglog_slope,
    machine_info,
    model_spec,
    rotate,
    setup_torch,
    summary,
    timed,
    write_result,
)
from benchmarks.probe_vs_paper import PROBE_FILE_TYPES, dynlab_probe_stats, encode_probe_rows, init_probe_state


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def probe_scaling(args: argparse.Namespace) -> dict[str, Any]:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    from benchmarks.probe_vs_paper import probe_module

    module = probe_module(model_spec("smollm2"), args.device, dtype)
    types = list(PROBE_FILE_TYPES)
    n_rows = max(max(ints(args.prompts)), args.fixed_prompts)
    examples = encode_probe_rows(module.tokenizer, hh_rows(limit=n_rows), types)
    init_probe_state(module, examples, types)
    configs = [("prompts", n, len(types)) for n in ints(args.prompts)]
    configs += [("types", args.fixed_prompts, t) for t in ints(args.types)]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    subsets = {c: [{**e, "responses": {k: e["responses"][k] for k in types[: c[2]]}} for e in examples[: c[1]]]
               for c in configs}
    tokens = {c: sum(len(e["prompt_ids"]) + sum(len(r) for r in e["responses"].values()) for e in subsets[c])
              for c in configs}
    dynlab_probe_stats(module, examples[:1], args.device)  # warm-up
    for r in range(args.rounds):
        for config in rotate(configs, r):
            times[config].append(timed(lambda: dynlab_probe_stats(module, subsets[config], args.device),
                                       args.device)[0])
            print(f"  probe {config}: {times[config][-1]:.2f}s", flush=True)
    out: dict[str, Any] = {}
    for axis in ("prompts", "types"):
        chosen = [c for c in configs if c[0] == axis]
        xs = [c[1] if axis == "prompts" else c[2] for c in chosen]
        meds = [statistics.median(times[c]) for c in chosen]
        # rows and types differ in length, so the exponent against the tokens scored is the cleaner one
        out[axis] = {"x": xs, "tokens": [tokens[c] for c in chosen], "seconds": [summary(times[c]) for c in chosen],
                     "exponent": loglog_slope(xs, meds),
                     "exponent_vs_tokens": loglog_slope([tokens[c] for c in chosen], meds),
                     **({"types": len(types)} if axis == "prompts" else {"prompts": args.fixed_prompts})}
    return out


def fixed_length_pairs(tokenizer, length: int, pairs: int, rounds: int) -> list[list[dict]]:
    """``rounds`` groups of ``pairs`` DPO examples whose sequences are exactly ``length`` tokens."""
    stream: list[int] = []
    for row in hh_rows(limit=400):
        stream += tokenizer(row["prompt"] + row["chosen"] + row["rejected"])["input_ids"]
    half, need = length // 2, rounds * pairs * 3
    if len(stream) < need * half:
        raise SystemExit(f"not enough HH text for {need} windows of {half} tokens")
    windows = [stream[i * half:(i + 1) * half] for i in range(need)]
    examples = [{"index": i, "prompt_ids": windows[3 * i], "chosen_ids": windows[3 * i + 1],
                 "rejected_ids": windows[3 * i + 2]} for i in range(rounds * pairs)]
    return [examples[g * pairs:(g + 1) * pairs] for g in range(rounds)]


def train_scaling(args: argparse.Namespace, root: str) -> dict[str, Any]:
    from benchmarks.train_throughput import dynlab_runner, make_dynlab
    from dynlab.data.tokenize import DPOCollator

    module = make_dynlab("dpo", model_spec(args.train_model), args)
    run = dynlab_runner(module, args, root)
    collate = DPOCollator(module.tokenizer.pad_token_id)
    lengths = ints(args.lengths)
    per_step = args.warmup + args.steps
    batches = {n: [collate(g) for g in fixed_length_pairs(module.tokenizer, n, args.pairs, per_step)]
               for n in lengths}
    times: dict[int, list[float]] = {n: [] for n in lengths}
    for r in range(args.rounds):
        for n in rotate(lengths, r):
            times[n] += run(batches[n], args.warmup)
            print(f"  train L={n}: " + ", ".join(f"{t:.2f}s" for t in times[n][-args.steps:]), flush=True)
    meds = [statistics.median(times[n]) for n in lengths]
    return {"model": args.train_model, "pairs": args.pairs, "sequences": 2 * args.pairs, "lengths": lengths,
            "step_seconds": [summary(times[n]) for n in lengths], "exponent": loglog_slope(lengths, meds)}


def main(argv: Sequence[str] | None = None) -> dict:
    from benchmarks.train_throughput import quiet_libraries

    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--prompts", default="2,4,8", help="probe prompt counts (all 12 types)")
    parser.add_argument("--types", default="3,6,12", help="response type counts")
    parser.add_argument("--fixed-prompts", type=int, default=2, help="prompts when varying the types")
    parser.add_argument("--lengths", default="64,128,256", help="training sequence lengths")
    parser.add_argument("--train-model", default="llama20m", choices=("llama20m", "smollm2"))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.types, args.fixed_prompts, args.lengths = "1,2", "3,6", 1, "32,64"
        args.rounds, args.steps, args.pairs = 1, 1, 2
    setup_torch(args)
    quiet_libraries()
    result: dict[str, Any] = {"benchmark": "scaling", "machine": machine_info(args), "settings": {
        k: getattr(args, k) for k in ("prompts", "types", "fixed_prompts", "lengths", "train_model", "pairs",
                                      "rounds", "warmup", "steps")}}
    result["probe"] = probe_scaling(args)
    with tempfile.TemporaryDirectory(prefix="dynlab-bench-") as root:
        result["train"] = train_scaling(args, root)
    write_result(args.out, "scaling", result)
    return result


if __name__ == "__main__":
    main()
