"""Before/after of the fixes the targets called for, measured in one process with the two code paths alternated.

    python -m benchmarks.before_after [--steps 6] [--quick]      (about 8 minutes on 2 CPU cores; not in make bench)

- DPO step: ``DPOModule.response_states`` (each pair's prompt once, its KV cache serving chosen and rejected,
  responses grouped by length) against the base class's (one concatenated (2B, T) forward), SmolLM2, the
  throughput benchmark's batches; reference forward, backward and AdamW step included in both.
- SFT step: ``SFTModule.response_states`` (rows grouped by length) against the base class's single forward.
- Probe evaluation of the embedded default's probe sets (configs/dpo.yaml, 32 prompts x 11 types): ``probe_step``
  (a batch's rows together, responses grouped across rows at 10% padding) against the previous row-by-row scorer
  (each row's prompt once, its responses grouped at 25% padding), which dynlab keeps for sliding-window models.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any
from unittest import mock

import torch

from benchmarks.common import (
    REPO,
    add_common_args,
    hh_rows,
    machine_info,
    model_spec,
    preference_examples,
    setup_torch,
    summary,
    timed,
    write_result,
)
from benchmarks.train_throughput import BETA, CLIP, adamw, quiet_libraries, sft_examples


def ab(fast, slow, n: int, device: str) -> dict[str, Any]:
    """``n`` alternated calls of each; ratio = slow / fast (> 1: the fix is faster)."""
    times: dict[str, list[float]] = {"after": [], "before": []}
    for i in range(n):
        for name, fn in ((("after", fast), ("before", slow)) if i % 2 == 0 else (("before", slow), ("after", fast))):
            times[name].append(timed(functools.partial(fn, i), device)[0])
        print(f"  {i}: after {times['after'][-1]:.2f}s, before {times['before'][-1]:.2f}s", flush=True)
    per = [b / a for a, b in zip(times["after"], times["before"])]
    return {"after_seconds": summary(times["after"]), "before_seconds": summary(times["before"]),
            "speedup": {"median": statistics.median(times["before"]) / statistics.median(times["after"]),
                        "min": min(per), "max": max(per)}}


def training(algo: str, args: argparse.Namespace) -> dict[str, Any]:
    from dynlab.data.tokenize import DPOCollator, SFTCollator
    from dynlab.losses.dpo import dpo_loss
    from dynlab.losses.logps import segment_sum
    from dynlab.modules import DPOModule, SFTModule
    from dynlab.modules.base import CausalLMModule

    module = (DPOModule if algo == "dpo" else SFTModule)(policy=model_spec(args.model)).to(args.device)
    reference = module.reference.to(args.device) if algo == "dpo" else None
    examples = preference_examples(module.tokenizer, hh_rows(limit=8 * (args.steps + 1)), 128, 64)
    if algo == "dpo":
        batches = [DPOCollator(module.tokenizer.pad_token_id)(examples[i:i + 4]) for i in range(0, len(examples), 4)]
    else:
        seqs = sft_examples(examples)
        batches = [SFTCollator(module.tokenizer.pad_token_id)(seqs[i:i + 8]) for i in range(0, len(seqs), 8)]
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    optimizer = adamw(module.policy.parameters())

    def step(new: bool, i: int) -> None:
        batch = batches[i + 1]
        n = batch["input_ids"].shape[0]

        def logps(model=None):
            base_forward = functools.partial(CausalLMModule.response_states, module)  # "before": one padded forward
            with nullcontext() if new else mock.patch.object(module, "response_states", base_forward):
                return segment_sum(*module.response_token_logps(batch, model), n)

        if algo == "dpo":
            chosen, rejected = logps().chunk(2)
            with torch.no_grad():
                ref_chosen, ref_rejected = logps(reference).chunk(2)
            loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=BETA)[0].mean()
        else:
            loss = -logps().sum() / (batch["labels"] != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.policy.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(True, -1)  # warm-up (optimizer state)
    return ab(functools.partial(step, True), functools.partial(step, False), args.steps, args.device)


def probes(args: argparse.Namespace) -> dict[str, Any]:
    import yaml
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from dynlab.data import ProbeDataModule
    from dynlab.models import forward
    from dynlab.modules import SFTModule
    from dynlab.modules import base as base_module

    data_cfg = yaml.safe_load((REPO / "configs" / "dpo.yaml").read_text())["data"]["init_args"]
    module = SFTModule(policy=model_spec(args.model)).to(args.device)
    module.policy.eval()
    data = ProbeDataModule(**data_cfg)
    data.prepare(module.tokenizer, "sft")
    module.init_probe_state(data)
    batches = {s: [move_data_to_device(b, args.device) for b in data.probe_dataloader(s)] for s in data.probe_types}

    def previous(model, prompts, responses, max_padding=0.25, max_tokens=4096):  # the row-by-row scorer
        return forward.rows_one_by_one(model, prompts, responses, 0.25)

    def evaluate(old: bool, i: int) -> None:
        with mock.patch.object(base_module, "shared_prompt_hidden_rows", previous) if old else nullcontext():
            for split, split_batches in batches.items():
                for batch in split_batches:
                    module.probe_step(split, batch)
            module.compute_probe_metrics()

    evaluate(False, -1)  # warm-up
    rows = sum(len(v) for v in data.probe_examples.values())
    return {"probe_rows": rows, **ab(functools.partial(evaluate, False), functools.partial(evaluate, True),
                                     max(2, args.steps // 2), args.device)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "llama20m"))
    parser.add_argument("--steps", type=int, default=6, help="alternated training steps per arm")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps = "llama20m", 2
    setup_torch(args)
    quiet_libraries()
    result = {"benchmark": "before_after", "machine": machine_info(args), "settings": {"model": args.model,
                                                                                      "steps": args.steps}}
    for name, fn in (("dpo_step", functools.partial(training, "dpo")), ("sft_step", functools.partial(training, "sft")),
                     ("probe_evaluation", probes)):
        print(name, flush=True)
        result[name] = fn(args)
    write_result(args.out, "before_after", result)
    return result


if __name__ == "__main__":
    main()
