"""Training throughput: dynlab against Hugging Face TRL and a bare PyTorch loop, DPO and SFT, on identical batches.

    python -m benchmarks.train_throughput [--models smollm2,llama20m] [--algos dpo,sft] [--quick]
        [--device cuda --dtype bf16]

What each system runs (the same model weights, batches, batch size, sequence length, precision, optimizer, gradient
clipping and reference handling):

- ``dynlab``: the real ``DPOModule`` / ``SFTModule`` training step through a Lightning ``Trainer.fit`` (logger,
  checkpointing, progress bar and probe evaluation off), timed by a callback from ``on_train_batch_start`` to
  ``on_train_batch_end``: forward, backward, gradient clipping and optimizer step, with Lightning's own overhead.
  The HF export a fit writes at its end is skipped (it is not training).
- ``trl``: ``trl.DPOTrainer`` / ``trl.SFTTrainer`` ``.train()``, timed by a ``TrainerCallback`` from
  ``on_step_begin`` to ``on_step_end`` (both after the batch is fetched, like Lightning's hooks). TRL 1.x defaults
  that differ from dynlab's are set to dynlab's: ``bf16=False`` (unless ``--dtype bf16``),
  ``gradient_checkpointing=False``, constant learning rate, ``max_grad_norm`` 10, no logging, saving or
  evaluation, sequential sampling; the reference is passed in as the same frozen copy (not reloaded from the hub),
  ``precompute_ref_log_probs=False`` as in dynlab's default. TRL tokenizes text itself, so its prepared dataset is
  replaced by the very token ids dynlab trains on (TRL has no ``max_prompt_length``: prompts are cut beforehand).
- ``bare``: a plain PyTorch loop, the floor: one concatenated chosen+rejected forward (``model(...).logits``, the
  full (B, T, V) logits), log-softmax and gather as in the original DPO code, the reference under ``no_grad``, the
  sigmoid loss, gradient clipping, AdamW. SFT: the same with token-mean cross-entropy.

Every system gets the same ``torch.optim.AdamW(lr=5e-6, weight_decay=0)`` and, on a GPU with ``--dtype bf16``,
bf16 autocast over float32 weights (Lightning ``bf16-mixed``, TRL ``bf16=True``, ``torch.autocast``).

Tokens/s = real (non-pad) tokens of prompt + response in the step's batch (for DPO both sequences of a pair, so
the prompt counts twice, as it is computed twice) / step time. Each round runs every system for ``--warmup``
untimed and ``--steps`` timed steps on the same batches, in an order that rotates every round; figures are
medians over all timed steps, min-max over the rounds' own ratios. Each round also times a large matmul: the
hardware ceiling is 6 x parameters x tokens/s over that peak.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from benchmarks.common import (
    add_common_args,
    hh_rows,
    machine_info,
    model_spec,
    preference_examples,
    rotate,
    setup_torch,
    summary,
    sync,
    timed,
    verdict,
    write_result,
)

LR, BETA, CLIP = 5e-6, 0.1, 10.0
SYSTEMS = ("dynlab", "trl", "bare")
TARGET_VS_TRL = 1.5  # dynlab tokens/s over TRL's
TARGET_VS_BARE = 1 / 1.15  # dynlab within 15% of the bare loop: its step time at most 1.15x


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


# ---- batches --------------------------------------------------------------------------------------------------------
def sft_examples(pairs: list[dict]) -> list[dict]:
    return [{"index": p["index"], "prompt_ids": p["prompt_ids"], "response_ids": p["chosen_ids"]} for p in pairs]


def batch_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


# ---- dynlab through Lightning ---------------------------------------------------------------------------------------
class FixedBatches(L.LightningDataModule):
    """Pre-collated batches, in order; no probe sets (probe evaluation is off)."""

    probe_types: dict = {}
    probe_examples: dict = {}

    def __init__(self):
        super().__init__()
        self.batches: list[dict] = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)


class StepTimer(L.Callback):
    """Wall time from ``on_train_batch_start`` to ``on_train_batch_end`` of every step (and each step's loss)."""

    def __init__(self, device: str):
        self.device, self.times, self.losses, self._start = device, [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)
        self.losses.append(outputs["loss"].detach())


class HFStepTimer(TrainerCallback):
    """Wall time from ``on_step_begin`` to ``on_step_end`` of every Hugging Face ``Trainer`` step (both after the batch
    is fetched, like Lightning's hooks in ``StepTimer``)."""

    def __init__(self, device: str):
        self.device, self.times, self._start = device, [], 0.0

    def on_step_begin(self, *a, **kw) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, *a, **kw) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)


def lightning_precision(dtype: str) -> str:
    return "bf16-mixed" if dtype == "bf16" else "32-true"


def lightning_trainer(args: argparse.Namespace, max_steps: int, callbacks: list, root: str, **kwargs: Any):
    cuda = args.device.startswith("cuda")
    devices = [torch.device(args.device).index or 0] if cuda else 1
    return L.Trainer(accelerator="gpu" if cuda else "cpu", devices=devices, precision=lightning_precision(args.dtype),
                     max_steps=max_steps, logger=kwargs.pop("logger", False), enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=CLIP,
                     num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks, **kwargs)


def make_dynlab(algo: str, spec, args: argparse.Namespace):
    from dynlab.modules import DPOModule, SFTModule

    common = dict(policy=spec, optimizer=adamw, probe_every_n_steps=0)
    module = DPOModule(beta=BETA, **common) if algo == "dpo" else SFTModule(reduction="token_mean", **common)
    module.on_train_end = lambda: None  # skip the HF export at the end of fit: not training
    return module


def dynlab_runner(module, args: argparse.Namespace, root: str) -> Callable[[list[dict], int], list[float]]:
    data = FixedBatches()

    def run(batches: list[dict], warmup: int) -> list[float]:
        data.batches = batches
        timer = StepTimer(args.device)
        lightning_trainer(args, len(batches), [timer], root).fit(module, datamodule=data)
        if not hasattr(run, "first_loss"):
            run.first_loss = float(timer.losses[0])
        return timer.times[warmup:]

    return run


# ---- TRL ------------------------------------------------------------------------------------------------------------
def trl_runner(algo: str, policy, reference, tokenizer, args: argparse.Namespace, pairs: int,
               root: str) -> Callable[[list[list[dict]], int], list[float]]:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    cuda = args.device.startswith("cuda")

    timer = HFStepTimer(args.device)
    common = dict(output_dir=root, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
                  max_grad_norm=CLIP, max_steps=1, bf16=args.dtype == "bf16", fp16=False,
                  gradient_checkpointing=False, gradient_accumulation_steps=1, logging_strategy="no",
                  save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
                  use_cpu=not cuda, seed=0, train_sampling_strategy="sequential", disable_tqdm=True, max_length=None)
    optimizer = adamw(policy.parameters())
    if algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(per_device_train_batch_size=pairs, beta=BETA, loss_type=["sigmoid"],
                           precompute_ref_log_probs=False, disable_dropout=True, **common)
        placeholder = Dataset.from_list([{"prompt": "Hi", "chosen": " a", "rejected": " b"}] * pairs)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=placeholder,
                             processing_class=tokenizer, callbacks=[timer], optimizers=(optimizer, None))

        def dataset(groups: list[list[dict]]):
            return Dataset.from_list([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                      for g in groups for e in g])
    else:
        from trl import SFTConfig, SFTTrainer

        def dataset(groups: list[list[dict]]):
            return Dataset.from_list([{"input_ids": e["prompt_ids"] + e["response_ids"],
                                       "labels": [-100] * len(e["prompt_ids"]) + e["response_ids"]}
                                      for g in groups for e in g])

        config = SFTConfig(per_device_train_batch_size=2 * pairs, packing=False, padding_free=False,
                           loss_type="nll", **common)
        trainer = SFTTrainer(model=policy, args=config, train_dataset=_sft_placeholder(), processing_class=tokenizer,
                             callbacks=[timer], optimizers=(optimizer, None))

    trainer.remove_callback(PrinterCallback)  # no metrics printed at the end of train()
    compute_loss = trainer.compute_loss

    def first_loss(*a, **kw):
        out = compute_loss(*a, **kw)
        if not hasattr(run, "first_loss"):
            run.first_loss = float((out[0] if isinstance(out, tuple) else out).detach())
        return out

    trainer.compute_loss = first_loss

    def run(groups: list[list[dict]], warmup: int) -> list[float]:
        trainer.train_dataset = dataset(groups)  # the exact token ids the other systems train on
        trainer.args.max_steps = len(groups)
        timer.times = []
        trainer.train()
        return timer.times[warmup:]

    return run


def _sft_placeholder():
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])


# ---- the bare loop --------------------------------------------------------------------------------------------------
def bare_logps(model, batch: dict) -> torch.Tensor:
    """The original DPO code's ``_get_batch_logps``: full logits, log-softmax, gather, masked sum -> (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    per_token = logits.float().log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)  # (B, T-1)
    return (per_token * mask).sum(-1)


def bare_runner(algo: str, policy, reference, args: argparse.Namespace) -> Callable[[list[dict], int], list[float]]:
    device = torch.device(args.device)
    policy.to(device).train()
    if reference is not None:
        reference.to(device).eval()
    optimizer = adamw(policy.parameters())
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(batch: dict) -> None:
        with autocast():
            if algo == "dpo":
                policy_chosen, policy_rejected = bare_logps(policy, batch).chunk(2)
                with torch.no_grad():
                    ref_chosen, ref_rejected = bare_logps(reference, batch).chunk(2)
                h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
                loss = -F.logsigmoid(BETA * h).mean()
            else:
                logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                       ignore_index=-100)
        if not hasattr(run, "first_loss"):
            run.first_loss = float(loss.detach())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run(batches: list[dict], warmup: int) -> list[float]:
        times = []
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            times.append(timed(lambda: step(batch), device)[0])
        return times[warmup:]

    return run


# ---- the hardware ceiling -------------------------------------------------------------------------------------------
def matmul_peak(args: argparse.Namespace, repeats: int = 2) -> dict[str, float]:
    """FLOP/s of a large square matmul (fp32; also bf16 when training in bf16), best of ``repeats``."""
    n = 1024 if args.quick else 4096
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and args.dtype != "bf16":
            continue
        a, b = (torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2))
        mm = functools.partial(torch.mm, a, b)
        mm()  # warm-up
        out[name] = 2 * n**3 / min(timed(mm, args.device)[0] for _ in range(repeats))
    return out


# ---- one (algorithm, model) comparison ------------------------------------------------------------------------------
def compare(algo: str, model_name: str, args: argparse.Namespace, rows: list[dict], peaks: list[dict],
            root: str) -> dict[str, Any]:
    from dynlab.data.tokenize import DPOCollator, SFTCollator

    dtype_name = "float32"  # weights stay fp32; bf16 is autocast in every system
    spec = model_spec(model_name, dtype_name)
    module = make_dynlab(algo, spec, args)
    tokenizer = module.tokenizer
    policy_trl, policy_bare = copy.deepcopy(module.policy), copy.deepcopy(module.policy)
    ref_trl = ref_bare = None
    if algo == "dpo":
        ref_trl, ref_bare = copy.deepcopy(module.reference), copy.deepcopy(module.reference)

    per_round = args.warmup + args.steps
    pairs = args.pairs
    examples = preference_examples(tokenizer, rows, args.max_length, args.max_prompt_length)
    if algo == "dpo":
        collate = DPOCollator(tokenizer.pad_token_id)
        groups = [examples[i * pairs:(i + 1) * pairs] for i in range(args.rounds * per_round)]
    else:  # SFT: as many sequences per step as DPO's chosen + rejected
        collate = SFTCollator(tokenizer.pad_token_id)
        seqs = sft_examples(examples)
        groups = [seqs[i * 2 * pairs:(i + 1) * 2 * pairs] for i in range(args.rounds * per_round)]
    if any(len(g) < len(groups[0]) for g in groups):
        raise SystemExit("not enough benchmark rows for --rounds x (--warmup + --steps) batches")
    batches = [collate(g) for g in groups]

    runners = {
        "dynlab": dynlab_runner(module, args, root),
        "trl": trl_runner(algo, policy_trl, ref_trl, tokenizer, args, pairs, root),
        "bare": bare_runner(algo, policy_bare, ref_bare, args),
    }
    times: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    tokens: dict[str, list[int]] = {s: [] for s in SYSTEMS}
    round_tps: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    for r in range(args.rounds):
        window = slice(r * per_round, (r + 1) * per_round)
        for system in rotate(SYSTEMS, r):
            arg = groups[window] if system == "trl" else batches[window]
            step_times = runners[system](arg, args.warmup)
            step_tokens = [batch_tokens(b) for b in batches[window][args.warmup:]]
            if len(step_times) != len(step_tokens):
                raise RuntimeError(f"{system}: timed {len(step_times)} steps, expected {len(step_tokens)}")
            times[system] += step_times
            tokens[system] += step_tokens
            round_tps[system].append(sum(step_tokens) / sum(step_times))
            print(f"  {algo}/{model_name} round {r} {system}: " + ", ".join(f"{t:.2f}s" for t in step_times),
                  flush=True)
        peaks.append(matmul_peak(args))

    params = sum(p.numel() for p in module.policy.parameters())
    out: dict[str, Any] = {"parameters": params, "sequences_per_step": batches[0]["input_ids"].shape[0],
                           # the same weights and batch: every system's first loss must agree (DPO: log 2)
                           "first_step_loss": {s: runners[s].first_loss for s in SYSTEMS},
                           "padded_width": summary([b["input_ids"].shape[1] for b in batches]),
                           "tokens_per_step": summary(tokens["dynlab"]), "systems": {}}
    for s in SYSTEMS:
        tps = [n / t for n, t in zip(tokens[s], times[s])]
        out["systems"][s] = {"step_seconds": summary(times[s]), "tokens_per_second": summary(tps),
                             "round_tokens_per_second": round_tps[s]}
    med = {s: out["systems"][s]["tokens_per_second"]["median"] for s in SYSTEMS}
    for peer, target in (("trl", TARGET_VS_TRL), ("bare", TARGET_VS_BARE)):
        per_round_ratio = [a / b for a, b in zip(round_tps["dynlab"], round_tps[peer])]
        out[f"dynlab_over_{peer}"] = {"median": med["dynlab"] / med[peer], "min": min(per_round_ratio),
                                      "max": max(per_round_ratio), "per_round": per_round_ratio,
                                      **{k: v for k, v in verdict(med["dynlab"] / med[peer], target, True).items()
                                         if k != "value"}}
    del module, policy_trl, policy_bare, ref_trl, ref_bare, runners
    gc.collect()
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--models", default="llama20m,smollm2")
    parser.add_argument("--algos", default="dpo,sft")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per system and round")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per system and round")
    parser.add_argument("--pairs", type=int, default=4, help="DPO pairs per step (SFT: twice as many sequences)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-prompt-length", type=int, default=64)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.steps, args.pairs = "llama20m", 2, 1, 2
    setup_torch(args)
    quiet_libraries()
    rows = hh_rows()
    result: dict[str, Any] = {"benchmark": "train_throughput", "machine": machine_info(args), "settings": {
        k: getattr(args, k) for k in ("models", "algos", "rounds", "warmup", "steps", "pairs", "max_length",
                                      "max_prompt_length")}, "runs": {}}
    result["settings"].update(lr=LR, beta=BETA, grad_clip=CLIP, optimizer="torch.optim.AdamW(weight_decay=0)",
                              data="first rows of ../shared/data/hh_probe/probe_test.jsonl (prompt, chosen, "
                                   "rejected), cut by dynlab's policy (prompt to its last max_prompt_length tokens, "
                                   "responses keeping their start)",
                              tokens_per_second="real (non-pad) prompt+response tokens of the step's batch / step "
                                                "time; DPO counts both sequences of a pair")
    peaks: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dynlab-bench-") as root:
        for model_name in args.models.split(","):
            for algo in args.algos.split(","):
                print(f"{algo} / {model_name}", flush=True)
                result["runs"][f"{algo}/{model_name}"] = compare(algo, model_name, args, rows, peaks, root)
    result["matmul_peak_flops"] = {k: summary([p[k] for p in peaks]) for k in peaks[0]}
    peak = result["matmul_peak_flops"][args.dtype]["median"]
    ceiling = {}
    for key, run in result["runs"].items():
        ceiling[key] = {s: 6 * run["parameters"] * run["systems"][s]["tokens_per_second"]["median"] / peak
                        for s in SYSTEMS}
    result["hardware_ceiling"] = {"definition": "6 x parameters x tokens/s (median) over the median peak FLOP/s of a "
                                                "large matmul in the same run. 6N leaves out DPO's reference forward "
                                                "and counts work dynlab skips (the vocabulary projection on prompt "
                                                "positions, the second copy of each DPO prompt, padding), so dynlab's "
                                                "fraction is an effective one", "fraction_of_peak": ceiling}
    write_result(args.out, "train_throughput", result)
    return result


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "transformers", "trl", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


if __name__ == "__main__":
    main()
