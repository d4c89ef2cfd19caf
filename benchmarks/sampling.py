"""Sampling: dynlab's batched generation against plain ``model.generate``, the on-policy DPO step split, SimPO memory.

    python -m benchmarks.sampling [--models smollm2] [--prompts 4 --max-new-tokens 32 --repeats 3] [--quick]
        [--parts generate,step,memory] [--device cuda --dtype bf16]

Three figures, each against a peer measured in the same run (issue #14):

- ``generate``: tokens/s of ``dynlab.models.generate.generate_token_ids`` (what ``negatives: policy`` samples with)
  against plain Hugging Face ``model.generate`` called directly: the same left-padded prompts (``tokenizer.pad``
  for plain), batch, ``temperature``, ``top_p``, ``top_k`` off, ``max_new_tokens``, KV cache on and torch seed
  (``seed + batch start`` in both). Tokens = generated tokens of every row up to and including its first EOS (both
  stop a row there; the padding after it is not counted). ``--repeats`` rounds, the order alternating, after one
  untimed greedy call of each (the warm-up); ratio dynlab / plain of the median tokens/s, target >= 1.0, and the
  same ratio from the process's CPU seconds (on a shared CPU: without the other jobs' share of the cores). Both
  must give the very same tokens for the same seed: checked sampled (every timed round) and greedy, and recorded.
- ``step``: one DPO step with ``negatives: policy`` against one with ``negatives: dataset`` on the same pairs,
  timed by part, as ``DPOModule.training_step`` runs them: sampling = ``DPOModule.sample_negatives(batch)`` (the
  rejected rows replaced by prompt + a policy sample), training = ``training_step`` (policy and reference forward,
  the DPO loss) + backward + gradient clipping + AdamW step on the batch it returns, or on the dataset batch. The
  sample file ``keep_samples`` writes is left out. One module serves both (its ``sampling`` spec is the one
  ``negatives: policy`` would use); ``--warmup`` untimed rounds first, then ``--steps`` timed rounds, the order
  alternating. Figure: on-policy step / off-policy step, and the share of the on-policy step spent sampling.
- ``memory``: peak RSS (``VmHWM``) of a process that builds ``DPOModule(loss_type="simpo")`` against one that
  builds it with ``"sigmoid"``, each (loss type, round) a fresh ``python -m benchmarks.sampling --worker LOSS_TYPE``
  (as ``benchmarks/lora.py`` measures memory). simpo must hold no reference (``module._reference`` empty; sigmoid
  one frozen copy), checked in the worker; every weight is read once after the build (the policy's are mapped from
  the safetensors file and only become resident when used). Ratios simpo / sigmoid of the peak RSS and of what
  building the module adds to the process (peak RSS - RSS before the build: the model weights part, expected ~0.5,
  target <= 0.6).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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
    timed,
    with_verdict,
    write_result,
)
from benchmarks.lora import rss_mb
from benchmarks.train_throughput import BETA, CLIP, adamw, batch_tokens, quiet_libraries

PARTS = ("generate", "step", "memory")
LOSS_TYPES = ("simpo", "sigmoid")
TARGET_VS_PLAIN = 1.0  # dynlab's generated tokens/s over plain model.generate's
TARGET_MEMORY = 0.6  # what building a simpo DPOModule adds over what a sigmoid one adds (one model copy of two)
RESULT_PREFIX = "SAMPLING_BENCH_RESULT "  # marks the worker's one JSON line among whatever libraries print


def bench_spec(name: str, dtype: str = "float32"):
    """``model_spec(name, dtype)``, plus ``tiny``: dynlab's test model (2 layers, hidden 64, its own tokenizer)."""
    from dynlab.models.load import ModelSpec

    return ModelSpec(name_or_path="tiny", dtype=dtype) if name == "tiny" else model_spec(name, dtype)


# ---- generation: dynlab against plain model.generate ----------------------------------------------------------------
def timed_cpu(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """``(wall seconds, this process's CPU seconds, fn())``: on a shared CPU the CPU time leaves out the time other
    processes held the cores (on CUDA it says little: the GPU's work is not in it)."""
    cpu = time.process_time()
    wall, out = timed(fn, device)
    return wall, time.process_time() - cpu, out


def cut_at_eos(row: list[int], eos: int) -> list[int]:
    """A generated row up to and including its first EOS (the padding after it dropped)."""
    return row[: row.index(eos) + 1] if eos in row else row


def plain_generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, do_sample: bool,
                   temperature: float, top_p: float, seed: int, batch_size: int) -> list[list[int]]:
    """The peer: ``model.generate`` called directly on ``tokenizer.pad``'s left-padded batches, torch seeded with
    ``seed + batch start`` before each, rows cut after their first EOS. B prompts -> B lists of token ids."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = dict(temperature=temperature, top_p=top_p) if do_sample else dict(temperature=None, top_p=None)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer.pad({"input_ids": [list(p) for p in prompts[start:start + batch_size]]},
                                padding_side="left", return_tensors="pt").to(device)
            torch.manual_seed(seed + start)
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=None,
                                       pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **sampling)
            new = generated[:, enc["input_ids"].shape[1]:]  # (batch, new tokens)
            out += [cut_at_eos(row, tokenizer.eos_token_id) for row in new.tolist()]
    return out


def compare_generation(model_name: str, args: argparse.Namespace, rows: list[dict]) -> dict[str, Any]:
    """``generate_token_ids`` against ``plain_generate`` on the first ``--prompts`` HH prompts: tokens/s per round,
    the ratio of the medians, and whether both gave the same tokens (sampled, every round; greedy, once)."""
    from dynlab.models.generate import generate_token_ids
    from dynlab.models.load import load_model, load_tokenizer

    spec = bench_spec(model_name, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype])
    tokenizer, model = load_tokenizer(spec), load_model(spec).to(args.device).eval()
    prompts = [e["prompt_ids"] for e in preference_examples(tokenizer, rows[:args.prompts], args.max_length,
                                                            args.max_prompt_length)]
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    batch_size=args.batch_size or len(prompts))
    systems: dict[str, Callable[..., list[list[int]]]] = {
        "dynlab": functools.partial(generate_token_ids, model, tokenizer, prompts, **settings),
        "plain": functools.partial(plain_generate, model, tokenizer, prompts, do_sample=True, **settings)}
    greedy = {name: fn(do_sample=False, seed=args.seed) for name, fn in systems.items()}  # also the warm-up
    seconds: dict[str, list[float]] = {s: [] for s in systems}
    cpu_seconds: dict[str, list[float]] = {s: [] for s in systems}
    tokens: dict[str, list[int]] = {s: [] for s in systems}
    identical_sampled = []
    for r in range(args.repeats):
        seed, out = args.seed + r, {}
        for name in rotate(tuple(systems), r):
            t, cpu, out[name] = timed_cpu(functools.partial(systems[name], seed=seed), args.device)
            seconds[name].append(t)
            cpu_seconds[name].append(cpu)
            tokens[name].append(sum(len(row) for row in out[name]))
        identical_sampled.append(out["dynlab"] == out["plain"])
        print(f"  generate/{model_name} round {r}: " + ", ".join(
            f"{s} {tokens[s][-1]} tokens in {seconds[s][-1]:.2f}s (CPU {cpu_seconds[s][-1]:.2f}s)" for s in systems),
              flush=True)
    tps = {s: [n / t for n, t in zip(tokens[s], seconds[s])] for s in systems}
    cpu_tps = {s: [n / t for n, t in zip(tokens[s], cpu_seconds[s])] for s in systems}
    ratio = ratio_summary(tps["dynlab"], tps["plain"])
    return {"prompts": len(prompts), "prompt_tokens": summary([len(p) for p in prompts]),
            "settings": {**settings, "top_k": None, "seeds": [args.seed + r for r in range(args.repeats)]},
            "identical_tokens": {"greedy": greedy["dynlab"] == greedy["plain"],
                                 "sampled": all(identical_sampled), "sampled_per_round": identical_sampled},
            "systems": {s: {"seconds": summary(seconds[s]), "cpu_seconds": summary(cpu_seconds[s]),
                            "generated_tokens": summary(tokens[s]), "tokens_per_second": summary(tps[s])}
                        for s in systems},
            "dynlab_over_plain": with_verdict(ratio, TARGET_VS_PLAIN, True),
            # the same figure from CPU seconds: what the code costs, without the other processes' share of the cores
            "dynlab_over_plain_cpu_time": ratio_summary(cpu_tps["dynlab"], cpu_tps["plain"])}


# ---- the on-policy step against the off-policy step -----------------------------------------------------------------
def step_batches(tokenizer, args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """``--warmup + --steps`` DPO batches of ``--pairs`` consecutive HH rows each (the dataset's rejected rows)."""
    from dynlab.data.tokenize import DPOCollator

    n, pairs = args.warmup + args.steps, args.pairs
    examples = preference_examples(tokenizer, rows[:n * pairs], args.max_length, args.max_prompt_length)
    if len(examples) < n * pairs:
        raise SystemExit("not enough benchmark rows for (--warmup + --steps) batches of --pairs")
    collate = DPOCollator(tokenizer.pad_token_id)
    return [collate(examples[i * pairs:(i + 1) * pairs]) for i in range(n)]


def compare_steps(model_name: str, args: argparse.Namespace, rows: list[dict]) -> dict[str, Any]:
    """Seconds of the on-policy step's sampling and training parts and of the off-policy step, per timed round, and
    the ratio on-policy / off-policy step."""
    from dynlab.models.sampling import SamplingSpec
    from dynlab.modules import DPOModule

    device = torch.device(args.device)
    torch.manual_seed(0)
    sampling = SamplingSpec(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    module = DPOModule(policy=bench_spec(model_name), beta=BETA, sampling=sampling, optimizer=adamw,
                       probe_every_n_steps=0).to(device)
    module.reference.to(device)  # kept out of the module tree: Lightning's on_fit_start moves it
    module.policy.train()
    optimizer = adamw(module.policy.parameters())
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def train(batch: dict) -> float:
        with autocast():
            loss = module.training_step(batch, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.policy.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    parts: dict[str, list[float]] = {"sampling": [], "on_policy_training": [], "off_policy_training": []}
    sampled_tokens, batch_tok = [], {"on_policy": [], "off_policy": []}
    for i, batch in enumerate(step_batches(module.tokenizer, args, rows)):
        batch = {k: v.to(device) for k, v in batch.items()}
        timed_round = i >= args.warmup
        for kind in rotate(("on_policy", "off_policy"), i):
            if kind == "on_policy":
                t_sample, (new, samples, _) = timed(functools.partial(module.sample_negatives, batch), device)
                t_train, _ = timed(functools.partial(train, new), device)
            else:
                new, t_sample = batch, 0.0
                t_train, _ = timed(functools.partial(train, batch), device)
            if timed_round:
                if kind == "on_policy":
                    parts["sampling"].append(t_sample)
                    sampled_tokens.append(sum(len(s) for s in samples))
                parts[f"{kind}_training"].append(t_train)
                batch_tok[kind].append(batch_tokens(new))
        if timed_round:
            print(f"  step/{model_name} round {i - args.warmup}: on-policy sampling {parts['sampling'][-1]:.2f}s + "
                  f"training {parts['on_policy_training'][-1]:.2f}s, "
                  f"off-policy {parts['off_policy_training'][-1]:.2f}s", flush=True)
    on_step = [s + t for s, t in zip(parts["sampling"], parts["on_policy_training"])]
    off_step = parts["off_policy_training"]
    ratio = ratio_summary(on_step, off_step)
    return {"parameters": sum(p.numel() for p in module.policy.parameters()), "pairs": args.pairs,
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed},
            "sampling_seconds": summary(parts["sampling"]),
            "on_policy_training_seconds": summary(parts["on_policy_training"]),
            "on_policy_step_seconds": summary(on_step), "off_policy_step_seconds": summary(off_step),
            "sampled_tokens_per_step": summary(sampled_tokens),
            "sampled_tokens_per_second": summary([n / t for n, t in zip(sampled_tokens, parts["sampling"])]),
            "batch_tokens": {k: summary(v) for k, v in batch_tok.items()},
            "sampling_share_of_on_policy_step": summary([s / t for s, t in zip(parts["sampling"], on_step)]),
            "on_policy_over_off_policy_step": ratio}


# ---- memory: simpo against sigmoid, a fresh process each ------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's resident high-water mark, in MiB (``VmHWM``). Not ``ru_maxrss``: Linux carries that over from
    the parent through fork and exec, so a worker spawned by a benchmark holding SmolLM2 would report its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_worker(loss_type: str, model_name: str, round_index: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build ``DPOModule(loss_type=loss_type)`` and report its reference count, the policy's weight MiB, RSS before
    and after the build, once every weight has been read, and the process's peak (MiB), and on CUDA the allocated
    GPU memory once policy and reference are on the device. simpo must hold no reference, any other loss exactly
    one."""
    from dynlab.modules import DPOModule

    if loss_type not in LOSS_TYPES:
        raise SystemExit(f"unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak is the build's, not an earlier one's
    rss_start = rss_mb()
    module = DPOModule(policy=bench_spec(model_name), loss_type=loss_type, beta=BETA, optimizer=adamw,
                       probe_every_n_steps=0)
    rss_built = rss_mb()
    # the policy's weights are mapped from the safetensors file and read in on first use (the reference, a deep
    # copy, is resident at once): read every weight, as the first forward does, so both hold what training holds
    with torch.no_grad():
        for model in (module.policy, *module._reference):
            for p in model.parameters():
                p.sum()
    rss_resident = rss_mb()
    references = len(module._reference)
    if references != (0 if loss_type == "simpo" else 1) or module.reference_free != (loss_type == "simpo"):
        raise RuntimeError(f"{loss_type}: {references} reference model(s) built, reference_free "
                           f"{module.reference_free}")
    cuda_mb = None
    if args.device.startswith("cuda"):
        module.to(args.device)
        for reference in module._reference:
            reference.to(args.device)
        torch.cuda.synchronize()
        cuda_mb = torch.cuda.memory_allocated() / 2**20
    weights = sum(p.numel() * p.element_size() for p in module.policy.parameters()) / 2**20
    return {"loss_type": loss_type, "model": model_name, "round": round_index, "references": references,
            "policy_weights_mb": weights, "rss_start_mb": rss_start, "rss_after_build_mb": rss_built,
            "rss_resident_mb": rss_resident, "peak_rss_mb": peak_rss_mb(), "cuda_mb": cuda_mb}


def spawn_worker(loss_type: str, model_name: str, round_index: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one (loss type, round) in a fresh process (its stderr passed through) and read back its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.sampling", "--worker", loss_type, "--models", model_name, "--round",
           str(round_index), "--device", args.device, "--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if proc.returncode or len(lines) != 1:
        raise SystemExit(f"worker {loss_type} (round {round_index}) failed: exit {proc.returncode}, "
                         f"{len(lines)} result lines; its output:\n{proc.stdout[-3000:]}")
    return json.loads(lines[0].removeprefix(RESULT_PREFIX))


def aggregate_memory(records: list[dict]) -> dict[str, Any]:
    """The memory figures from the workers' records (each loss type once per round)."""
    by = {lt: sorted((r for r in records if r["loss_type"] == lt), key=lambda r: r["round"]) for lt in LOSS_TYPES}
    adds = {lt: [r["peak_rss_mb"] - r["rss_start_mb"] for r in by[lt]] for lt in LOSS_TYPES}
    out: dict[str, Any] = {"policy_weights_mb": by["simpo"][0]["policy_weights_mb"], "loss_types": {}}
    for lt in LOSS_TYPES:
        out["loss_types"][lt] = {"references": by[lt][0]["references"],
                                 **{k: summary([r[k] for r in by[lt]])
                                    for k in ("rss_start_mb", "rss_after_build_mb", "rss_resident_mb",
                                              "peak_rss_mb")},
                                 "build_adds_mb": summary(adds[lt])}
        if all(r["cuda_mb"] is not None for r in by[lt]):
            out["loss_types"][lt]["cuda_mb"] = summary([r["cuda_mb"] for r in by[lt]])
    out["simpo_has_no_reference"] = all(r["references"] == 0 for r in by["simpo"])
    out["simpo_over_sigmoid_peak_rss"] = ratio_summary([r["peak_rss_mb"] for r in by["simpo"]],
                                                       [r["peak_rss_mb"] for r in by["sigmoid"]])
    q = ratio_summary(adds["simpo"], adds["sigmoid"])
    out["simpo_over_sigmoid_build_adds"] = with_verdict(q, TARGET_MEMORY, False)
    if all(r["cuda_mb"] is not None for r in records):
        out["simpo_over_sigmoid_cuda"] = ratio_summary([r["cuda_mb"] for r in by["simpo"]],
                                                       [r["cuda_mb"] for r in by["sigmoid"]])
    return out


# ---- the command line -----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``--quick``: 2 prompts, 16 new tokens, 2 rounds, 1 memory round)."""
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--models", default="smollm2", help="comma-separated: smollm2, llama20m, tiny")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    parser.add_argument("--prompts", type=int, default=4, help="HH prompts the generation comparison samples for")
    parser.add_argument("--batch-size", type=int, default=0, help="generation batch size (0: all prompts at once)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation and on-policy sampling")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed generation rounds per system")
    parser.add_argument("--pairs", type=int, default=2, help="DPO pairs per step in the step comparison")
    parser.add_argument("--warmup", type=int, default=1, help="untimed step rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed step rounds (one step of each kind)")
    parser.add_argument("--memory-rounds", type=int, default=2, help="fresh processes per loss type")
    parser.add_argument("--max-length", type=int, default=96, help="DPO pair tokens at most (prompt + response)")
    parser.add_argument("--max-prompt-length", type=int, default=48, help="prompt tokens at most (generation too)")
    parser.add_argument("--worker", choices=LOSS_TYPES, default=None, help="internal: build one DPOModule for "
                                                                           "--round and print its JSON line")
    parser.add_argument("--round", type=int, default=0, help="internal: the round a --worker runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.repeats, args.steps, args.memory_rounds = 2, 16, 2, 2, 1
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_torch(args)
    quiet_libraries()
    if args.worker:
        record = run_worker(args.worker, args.models, args.round, args)
        print(RESULT_PREFIX + json.dumps(record), flush=True)
        return record
    rows = hh_rows()
    parts = args.parts.split(",")
    result: dict[str, Any] = {"benchmark": "sampling", "machine": machine_info(args), "settings": {
        k: getattr(args, k) for k in ("models", "parts", "prompts", "batch_size", "max_new_tokens", "temperature",
                                      "top_p", "seed", "repeats", "pairs", "warmup", "steps", "memory_rounds",
                                      "max_length", "max_prompt_length")}, "runs": {}}
    result["settings"].update(
        beta=BETA, grad_clip=CLIP, optimizer="torch.optim.AdamW(lr=5e-6, weight_decay=0)",
        data="first rows of ../shared/data/hh_probe/probe_test.jsonl, cut by dynlab's policy (prompt to its last "
             "max_prompt_length tokens, responses keeping their start)",
        generated_tokens="tokens each row generated up to and including its first EOS, summed over the prompts",
        memory="peak RSS: VmHWM of the loss type's own process (imports, model load, DPOModule build, every weight "
               "read once); build adds = peak RSS - RSS before the build",
        shared_machine="a shared 2-core CPU: other jobs ran alongside (see the load averages), so read the ratios; "
                       "the generation figure is also given from CPU seconds")
    for model_name in args.models.split(","):
        run: dict[str, Any] = {}
        if "generate" in parts:
            print(f"generate / {model_name}", flush=True)
            run["generate"] = compare_generation(model_name, args, rows)
        if "step" in parts:
            print(f"step / {model_name}", flush=True)
            run["step"] = compare_steps(model_name, args, rows)
        if "memory" in parts:
            records = []
            for r in range(args.memory_rounds):
                for loss_type in rotate(LOSS_TYPES, r):
                    rec = spawn_worker(loss_type, model_name, r, args)
                    records.append(rec)
                    print(f"  memory/{model_name} round {r} {loss_type}: peak RSS {rec['peak_rss_mb']:.0f} MiB "
                          f"(before the build {rec['rss_start_mb']:.0f}), {rec['references']} reference(s)",
                          flush=True)
            run["memory"] = aggregate_memory(records)
        result["runs"][model_name] = run
    write_result(args.out, "sampling", result)
    return result


if __name__ == "__main__":
    main()
