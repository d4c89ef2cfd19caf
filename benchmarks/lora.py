"""LoRA-DPO step time and peak memory: dynlab's adapter training against its full-weight DPO and TRL + peft.

dynlab's LoRA-DPO against full-weight DPO and against TRL's DPOTrainer with the same peft config, on identical
batches, each (system, round) in a fresh process.

    python -m benchmarks.lora [--models smollm2] [--r 16 --alpha 32] [--quick] [--device cuda --dtype bf16]

What each system runs (the same base weights, batches, batch size, sequence length, precision, optimizer, gradient
clipping, and a LoRA adapter of the same r, alpha, dropout 0 and ``target_modules="all-linear"``):

- ``dynlab_lora``: ``DPOModule(adapter=AdapterSpec(r, alpha))`` through a Lightning ``Trainer.fit``, as
  ``benchmarks/train_throughput.py`` runs dynlab (logger, checkpointing, progress bar, probe evaluation and the HF
  export off; timed from ``on_train_batch_start`` to ``on_train_batch_end``). The reference is the same base with
  the adapter disabled: one copy of the base weights in memory.
- ``dynlab_full``: today's default, ``DPOModule`` on the full weights with a frozen reference copy.
- ``trl_lora``: ``trl.DPOTrainer(peft_config=peft.LoraConfig(...), ref_model=None)`` ``.train()``, so TRL wraps the
  model itself and computes the reference with the adapter disabled; timed from ``on_step_begin`` to
  ``on_step_end``. Set as train_throughput sets TRL: ``bf16=False`` (unless ``--dtype bf16``), no gradient
  checkpointing, constant learning rate, ``max_grad_norm`` 10, no logging, saving or evaluation, sequential
  sampling, ``precompute_ref_log_probs=False``, the prepared dataset replaced by dynlab's exact token ids.

Every system trains with ``torch.optim.AdamW(lr=5e-6, weight_decay=0)`` over its trainable parameters. The LoRA A
matrices come from torch's generator seeded with 0 just before the adapter is made (TRL's ``set_seed(args.seed)``,
and ``torch.manual_seed(0)`` before dynlab builds its module), so both adapters start from the same weights (a
checksum of them is recorded) and, B being 0 at init, every system's first loss is log 2.

Memory needs one process per system: each (system, round) is a fresh ``python -m benchmarks.lora --worker SYSTEM``
that loads the model, builds the round's batches, runs ``--warmup`` untimed and ``--steps`` timed steps and prints
one JSON line. Peak RSS is the process's ``getrusage(RUSAGE_SELF).ru_maxrss`` at its end (the high-water mark of
the whole process: imports, model load and training); the RSS after the model(s) are built, before the first step,
is the baseline, so the table shows what training adds. On CUDA ``torch.cuda.max_memory_allocated`` is recorded too
and is the memory the target reads (host RSS says little there). The system order rotates every round; step
figures are medians over all timed steps, memory medians over the rounds, min-max over the rounds' own ratios.

Targets (issue #16): dynlab_lora >= 1.5x trl_lora's tokens/s; dynlab_lora's peak memory <= 0.6x dynlab_full's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    add_common_args,
    hh_rows,
    machine_info,
    model_spec,
    preference_examples,
    ratio_summary,
    rotate,
    setup_torch,
    summary,
    with_verdict,
    write_result,
)
from benchmarks.train_throughput import (
    BETA,
    CLIP,
    LR,
    HFStepTimer,
    adamw,
    batch_tokens,
    dynlab_runner,
    quiet_libraries,
)

SYSTEMS = ("dynlab_lora", "dynlab_full", "trl_lora")
ADAPTER_SEED = 0  # TRL's DPOConfig(seed=0): set_seed(0) just before it calls get_peft_model
TARGET_VS_TRL = 1.5  # dynlab_lora tokens/s over trl_lora's
TARGET_MEMORY = 0.6  # dynlab_lora peak memory over dynlab_full's
RESULT_PREFIX = "LORA_BENCH_RESULT "  # marks the worker's one JSON line among whatever libraries print


# ---- memory ---------------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """The process's resident set now, in MiB (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    """The process's resident high-water mark since it started, in MiB: ``ru_maxrss`` (KiB on Linux), or ``VmHWM``
    where that is higher (``ru_maxrss`` is updated lazily and can trail the resident set read just before it)."""
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm) / 1024


# ---- models and batches ---------------------------------------------------------------------------------------------
def bench_spec(name: str):
    """``model_spec(name)``, plus ``tiny``: dynlab's test model (2 layers, hidden 64, its own tokenizer)."""
    if name == "tiny":
        from dynlab.models.load import ModelSpec

        return ModelSpec(name_or_path="tiny")
    return model_spec(name, "float32")  # weights stay fp32; bf16 is autocast in every system


def round_batches(tokenizer, args: argparse.Namespace, rows: list[dict], round_index: int) -> list[list[dict]]:
    """The ``--warmup + --steps`` groups of ``--pairs`` examples round ``round_index`` trains on (every system and
    process cuts the same rows the same way, so one round's systems see the same token ids)."""
    per_round, pairs = args.warmup + args.steps, args.pairs
    start = round_index * per_round * pairs
    examples = preference_examples(tokenizer, rows[start:start + per_round * pairs], args.max_length,
                                   args.max_prompt_length)
    groups = [examples[i * pairs:(i + 1) * pairs] for i in range(per_round)]
    if any(len(g) < pairs for g in groups):
        raise SystemExit("not enough benchmark rows for --rounds x (--warmup + --steps) batches of --pairs")
    return groups


def lora_checksum(model: torch.nn.Module) -> dict[str, Any]:
    """How many LoRA A matrices ``model`` holds and the float64 sum of their entries (and of their squares): the
    same numbers in two systems mean the same adapter init."""
    tensors = [p.detach().double() for name, p in model.named_parameters() if ".lora_A." in name]
    return {"matrices": len(tensors), "sum": sum(float(t.sum()) for t in tensors),
            "sum_of_squares": sum(float((t * t).sum()) for t in tensors)}


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_module(system: str, spec, args: argparse.Namespace):
    """dynlab's ``DPOModule`` for ``dynlab_lora`` (with ``AdapterSpec(r, alpha, dropout 0)``) or ``dynlab_full``."""
    from dynlab.models.adapter import AdapterSpec
    from dynlab.modules import DPOModule

    adapter = AdapterSpec(r=args.r, alpha=args.alpha, dropout=0.0) if system == "dynlab_lora" else None
    torch.manual_seed(ADAPTER_SEED)  # the LoRA A init, as TRL seeds it
    module = DPOModule(policy=spec, adapter=adapter, beta=BETA, optimizer=adamw, probe_every_n_steps=0)
    module.on_train_end = lambda: None  # skip the HF export at the end of fit: not training
    return module


# ---- TRL with peft --------------------------------------------------------------------------------------------------
def trl_lora_trainer(policy, tokenizer, args: argparse.Namespace, root: str):
    """``trl.DPOTrainer`` over ``policy`` with ``peft_config`` (TRL makes the PeftModel; no reference model: the
    adapter is disabled for it), the step timer, and the first loss; settings as train_throughput's TRL."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    timer = HFStepTimer(args.device)
    config = DPOConfig(output_dir=root, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant",
                       warmup_steps=0, max_grad_norm=CLIP, max_steps=1, bf16=args.dtype == "bf16", fp16=False,
                       gradient_checkpointing=False, gradient_accumulation_steps=1, logging_strategy="no",
                       save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
                       use_cpu=not args.device.startswith("cuda"), seed=ADAPTER_SEED,
                       train_sampling_strategy="sequential", disable_tqdm=True, max_length=None,
                       per_device_train_batch_size=args.pairs, beta=BETA, loss_type=["sigmoid"],
                       precompute_ref_log_probs=False, disable_dropout=True)
    peft_config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear",
                             bias="none", task_type="CAUSAL_LM")
    placeholder = Dataset.from_list([{"prompt": "Hi", "chosen": " a", "rejected": " b"}] * args.pairs)
    trainer = DPOTrainer(model=policy, ref_model=None, args=config, train_dataset=placeholder,
                         processing_class=tokenizer, callbacks=[timer], peft_config=peft_config)
    # the same optimizer as the other systems, over the parameters TRL's PeftModel trains
    trainer.optimizer = adamw([p for p in trainer.model.parameters() if p.requires_grad])
    trainer.remove_callback(PrinterCallback)  # no metrics printed at the end of train()
    compute_loss, losses = trainer.compute_loss, []

    def first_loss(*a, **kw):
        out = compute_loss(*a, **kw)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = first_loss
    return trainer, timer, losses


# ---- one (system, round): the worker process ------------------------------------------------------------------------
def run_worker(system: str, model_name: str, round_index: int, args: argparse.Namespace,
               rows: list[dict]) -> dict[str, Any]:
    """Build ``system`` on ``model_name``, train round ``round_index``'s batches, and report what it measured:
    step seconds (timed steps), tokens per timed step, first loss, trainable parameters, the adapter checksum,
    RSS at start / after the model is built / peak (MiB), and on CUDA the peak allocated GPU memory (MiB)."""
    from dynlab.data.tokenize import DPOCollator

    if system not in SYSTEMS:
        raise SystemExit(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")
    cuda = args.device.startswith("cuda")
    rss_start = rss_mb()
    spec = bench_spec(model_name)
    with tempfile.TemporaryDirectory(prefix="dynlab-bench-lora-") as root:
        if system == "trl_lora":
            from dynlab.models.load import load_model, load_tokenizer

            tokenizer, policy = load_tokenizer(spec), load_model(spec).train()
            parameters = sum(p.numel() for p in policy.parameters())
            trainer, timer, losses = trl_lora_trainer(policy, tokenizer, args, root)
            model = trainer.model.get_base_model()
        else:
            module = make_module(system, spec, args)
            tokenizer, model = module.tokenizer, module.policy
            parameters = sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)
        rss_loaded, lora_init = rss_mb(), lora_checksum(model)  # before training moves A
        groups = round_batches(tokenizer, args, rows, round_index)
        collate = DPOCollator(tokenizer.pad_token_id)
        batches = [collate(g) for g in groups]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if system == "trl_lora":
            from datasets import Dataset

            trainer.train_dataset = Dataset.from_list(  # the exact token ids the other systems train on
                [{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for g in groups for e in g])
            trainer.args.max_steps = len(groups)
            trainer.train()
            step_times, first = timer.times[args.warmup:], losses[0]
        else:
            run = dynlab_runner(module, args, root)
            step_times = run(batches, args.warmup)
            first = run.first_loss
    tokens = [batch_tokens(b) for b in batches[args.warmup:]]
    if len(step_times) != len(tokens):
        raise RuntimeError(f"{system}: timed {len(step_times)} steps, expected {len(tokens)}")
    return {"system": system, "model": model_name, "round": round_index, "step_seconds": step_times,
            "tokens": tokens, "first_loss": first, "parameters": parameters,
            "trainable_parameters": trainable_parameters(model), "lora_init": lora_init,
            "sequences_per_step": int(batches[0]["input_ids"].shape[0]),
            "padded_width": [int(b["input_ids"].shape[1]) for b in batches],
            "rss_start_mb": rss_start, "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def worker_command(system: str, model_name: str, round_index: int, args: argparse.Namespace) -> list[str]:
    """The command line of one (system, round) process: this module in ``--worker`` mode with the run's settings."""
    cmd = [sys.executable, "-m", "benchmarks.lora", "--worker", system, "--models", model_name, "--round",
           str(round_index), "--device", args.device, "--dtype", args.dtype]
    for flag in ("warmup", "steps", "pairs", "max_length", "max_prompt_length", "r", "alpha"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def spawn_worker(system: str, model_name: str, round_index: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one (system, round) in a fresh process (its stderr passed through) and read back its JSON line."""
    proc = subprocess.run(worker_command(system, model_name, round_index, args), stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if proc.returncode or len(lines) != 1:
        raise SystemExit(f"worker {system} (round {round_index}) failed: exit {proc.returncode}, "
                         f"{len(lines)} result lines; its output:\n{proc.stdout[-3000:]}")
    return json.loads(lines[0].removeprefix(RESULT_PREFIX))


# ---- the figures ----------------------------------------------------------------------------------------------------
def aggregate(records: list[dict], memory: str) -> dict[str, Any]:
    """One model's figures from its workers' records (each system once per round, rounds in order).

    ``memory`` is the record field the memory target reads: ``peak_rss_mb`` (CPU) or ``cuda_peak_mb`` (CUDA).
    """
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in records)]
    by = {s: sorted((r for r in records if r["system"] == s), key=lambda r: r["round"]) for s in systems}
    first = by[systems[0]][0]
    out: dict[str, Any] = {"parameters": first["parameters"], "sequences_per_step": first["sequences_per_step"],
                           "tokens_per_step": summary([n for r in by[systems[0]] for n in r["tokens"]]),
                           "padded_width": summary([w for r in by[systems[0]] for w in r["padded_width"]]),
                           # the same base weights and batch, B = 0: every system's first loss must be log 2
                           "first_step_loss": {s: by[s][0]["first_loss"] for s in systems},
                           "first_step_loss_per_round": {s: [r["first_loss"] for r in by[s]] for s in systems},
                           "memory_target_reads": memory, "systems": {}}
    round_tps: dict[str, list[float]] = {}
    for s in systems:
        times = [t for r in by[s] for t in r["step_seconds"]]
        tps = [n / t for r in by[s] for n, t in zip(r["tokens"], r["step_seconds"])]
        round_tps[s] = [sum(r["tokens"]) / sum(r["step_seconds"]) for r in by[s]]
        sysr = {"step_seconds": summary(times), "tokens_per_second": summary(tps),
                "round_tokens_per_second": round_tps[s],
                "trainable_parameters": by[s][0]["trainable_parameters"], "lora_init": by[s][0]["lora_init"]}
        for key in ("rss_start_mb", "rss_after_load_mb", "peak_rss_mb"):
            sysr[key] = summary([r[key] for r in by[s]])
        sysr["training_adds_rss_mb"] = summary([r["peak_rss_mb"] - r["rss_after_load_mb"] for r in by[s]])
        if all(r["cuda_peak_mb"] is not None for r in by[s]):
            sysr["cuda_peak_mb"] = summary([r["cuda_peak_mb"] for r in by[s]])
        out["systems"][s] = sysr
    if "dynlab_lora" in by and "trl_lora" in by:
        q = ratio_summary(round_tps["dynlab_lora"], round_tps["trl_lora"])
        q["median"] = (out["systems"]["dynlab_lora"]["tokens_per_second"]["median"]
                       / out["systems"]["trl_lora"]["tokens_per_second"]["median"])
        out["lora_over_trl_tokens_per_second"] = with_verdict(q, TARGET_VS_TRL, True)
    if "dynlab_lora" in by and "dynlab_full" in by:
        q = ratio_summary([r[memory] for r in by["dynlab_lora"]], [r[memory] for r in by["dynlab_full"]])
        out["lora_over_full_peak_memory"] = with_verdict(q, TARGET_MEMORY, False)
        out["lora_over_full_step_seconds"] = ratio_summary(
            [statistics.median(r["step_seconds"]) for r in by["dynlab_lora"]],
            [statistics.median(r["step_seconds"]) for r in by["dynlab_full"]])
        out["lora_over_full_step_seconds"]["median"] = (out["systems"]["dynlab_lora"]["step_seconds"]["median"]
                                                        / out["systems"]["dynlab_full"]["step_seconds"]["median"])
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``--quick``: llama20m, 2 rounds of 1 timed step, 2 pairs)."""
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--models", default="smollm2", help="comma-separated: smollm2, llama20m, tiny")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per system and round")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per system and round")
    parser.add_argument("--pairs", type=int, default=4, help="DPO pairs per step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (dynlab and TRL)")
    parser.add_argument("--alpha", type=float, default=32, help="LoRA alpha (dynlab and TRL)")
    parser.add_argument("--worker", choices=SYSTEMS, default=None, help="internal: run one system for --round and "
                                                                        "print its JSON line")
    parser.add_argument("--round", type=int, default=0, help="internal: the round a --worker runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.steps, args.pairs = "llama20m", 2, 1, 2
    unknown = [s for s in args.systems.split(",") if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; expected some of {', '.join(SYSTEMS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_torch(args)
    quiet_libraries()
    rows = hh_rows()
    if args.worker:
        record = run_worker(args.worker, args.models, args.round, args, rows)
        print(RESULT_PREFIX + json.dumps(record), flush=True)
        return record
    systems = args.systems.split(",")
    result: dict[str, Any] = {"benchmark": "lora", "machine": machine_info(args), "settings": {
        k: getattr(args, k) for k in ("models", "systems", "rounds", "warmup", "steps", "pairs", "max_length",
                                      "max_prompt_length", "r", "alpha")}, "runs": {}}
    result["settings"].update(lr=LR, beta=BETA, grad_clip=CLIP, lora_dropout=0.0, target_modules="all-linear",
                              optimizer="torch.optim.AdamW(weight_decay=0) over the trainable parameters",
                              data="first rows of ../shared/data/hh_probe/probe_test.jsonl (prompt, chosen, "
                                   "rejected), cut by dynlab's policy (prompt to its last max_prompt_length tokens, "
                                   "responses keeping their start)",
                              tokens_per_second="real (non-pad) prompt+response tokens of the step's batch / step "
                                                "time; both sequences of a pair count",
                              memory="peak RSS: ru_maxrss of the system's own process (imports, load, training); "
                                     "on CUDA the target reads torch.cuda.max_memory_allocated instead")
    memory = "cuda_peak_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    for model_name in args.models.split(","):
        records = []
        for r in range(args.rounds):
            for system in rotate(systems, r):
                rec = spawn_worker(system, model_name, r, args)
                records.append(rec)
                print(f"  lora/{model_name} round {r} {system}: " + ", ".join(f"{t:.2f}s" for t in rec["step_seconds"])
                      + f", peak RSS {rec['peak_rss_mb']:.0f} MiB (after load {rec['rss_after_load_mb']:.0f})",
                      flush=True)
        result["runs"][model_name] = aggregate(records, memory)
    write_result(args.out, "lora", result)
    return result


if __name__ == "__main__":
    main()
