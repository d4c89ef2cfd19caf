"""Render ``benchmarks/results/*.json`` as one markdown table per benchmark: ``benchmarks/results/RESULTS.md``.

    python -m benchmarks.report [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS


def mmm(s: dict, fmt: str = "{:.3g}", scale: float = 1.0) -> str:
    """median (min–max)"""
    return f"{fmt.format(s['median'] * scale)} ({fmt.format(s['min'] * scale)}–{fmt.format(s['max'] * scale)})"


def ok(d: dict) -> str:
    return f"{'**pass**' if d['pass'] else '**FAIL**'} ({d['target']})"


def machine_line(m: dict) -> str:
    line = (f"device `{m['device']}`, CPU `{m['cpu_model']}` ({m['cpu_count']} cores), torch threads "
            f"{m['torch_threads']}, {m['dtype']}, load average {m['load_average_at_start'][0]:.1f} at start / "
            f"{m['load_average_at_end'][0]:.1f} at end" + (" — **quick mode**" if m.get("quick") else ""))
    if m.get("gpu_note"):
        line += f"; {m['gpu_note']}"
    return line


def throughput(r: dict) -> list[str]:
    out = ["## 1. Training throughput (tokens/s; dynlab vs TRL vs a bare PyTorch loop)", "",
           machine_line(r["machine"]), "",
           f"Batches: {r['settings']['pairs']} DPO pairs (SFT: {2 * r['settings']['pairs']} sequences) of at most "
           f"{r['settings']['max_length']} tokens; {r['settings']['rounds']} rounds x {r['settings']['steps']} "
           f"timed steps per system after {r['settings']['warmup']} warm-up step(s) each round. Tokens/s: "
           f"{r['settings']['tokens_per_second']}. Targets: dynlab/TRL >= 1.5; dynlab/bare >= 0.87, i.e. dynlab's "
           f"step at most 1.15x the bare loop's.", "",
           "| run | params | system | step s | tokens/s | dynlab / peer | target |",
           "|---|---|---|---|---|---|---|"]
    for key, run in r["runs"].items():
        for s, sysr in run["systems"].items():
            ratio = target = ""
            if s != "dynlab":
                q = run[f"dynlab_over_{s}"]
                ratio, target = mmm(q, "{:.2f}"), ok(q)
            out.append(f"| {key} | {run['parameters'] / 1e6:.1f}M | {s} | {mmm(sysr['step_seconds'])} | "
                       f"{mmm(sysr['tokens_per_second'], '{:.0f}')} | {ratio} | {target} |")
    out += ["", "First step's loss (the same weights and batch in every system): " + "; ".join(
        f"{key} " + ", ".join(f"{s} {v:.6g}" for s, v in run["first_step_loss"].items())
        for key, run in r["runs"].items()) + "."]
    peak = r["matmul_peak_flops"]
    out += ["", "## 4. Hardware ceiling", "",
            "Peak of a large matmul, same run: " + ", ".join(f"{k} {mmm(v, '{:.1f}', 1e-9)} GFLOP/s"
                                                              for k, v in peak.items()) + ". "
            + r["hardware_ceiling"]["definition"] + ".", "",
            "| run | dynlab | TRL | bare |", "|---|---|---|---|"]
    for key, fr in r["hardware_ceiling"]["fraction_of_peak"].items():
        out.append(f"| {key} | {fr['dynlab']:.1%} | {fr['trl']:.1%} | {fr['bare']:.1%} |")
    return out


def overhead(r: dict) -> list[str]:
    s = r["settings"]
    out = ["## 2. Probe overhead (embedded default, the paper's cadence)", "", machine_line(r["machine"]), "",
           f"{s['config']}: {s['steps']} steps ({s['examples']} examples), probe evaluation {s['cadence']} = every "
           f"{s['probe_every_n_steps']} steps, {s['evaluations_per_run']} evaluations of {s['probe_rows']} prompts / "
           f"{s['responses_per_evaluation']} responses. Excluded from both runs: {s['excluded']}.", "",
           "| figure | value | target |", "|---|---|---|",
           f"| training wall, probes off (s) | {mmm(r['wall_off_seconds'])} | |",
           f"| training wall, probes on (s) | {mmm(r['wall_on_seconds'])} | |",
           f"| one probe evaluation (s) | {mmm(r['evaluation_seconds'])} | |",
           f"| one training step (s), off / on | {mmm(r['step_seconds_off'])} / {mmm(r['step_seconds_on'])} | |",
           f"| overhead at the paper's cadence, in-run ({r['overhead_long_run']['definition']}) | "
           f"{mmm(r['overhead_long_run'], '{:.1%}')} | {ok(r['overhead_long_run'])} |",
           f"| overhead at the paper's cadence, on vs off ({r['overhead_on_off']['definition']}) | "
           f"{mmm(r['overhead_on_off'], '{:.1%}')} | {ok(r['overhead_on_off'])} |",
           f"| wall on / off - 1 for this {s['steps']}-step run | {mmm(r['wall_ratio'], '{:.1%}')} | |"]
    return out


def versus_paper(r: dict) -> list[str]:
    s, a, m = r["settings"], r["agreement"], r["memory"]
    out = ["## 3. Probe evaluation: dynlab against the paper's method", "", machine_line(r["machine"]), "",
           f"{s['rows']} rows x {len(s['types'])} types of the HH probe file ({s['tokens']['prompt']} prompt and "
           f"{s['tokens']['response']} response tokens), {s['model']}, cut at {s['max_length']}/"
           f"{s['max_prompt_length']}; {s['repeats']} alternated repeats.", "",
           "| figure | value | target |", "|---|---|---|",
           f"| paper's method (s) | {mmm(r['paper_seconds'])} | |",
           f"| dynlab (s) | {mmm(r['dynlab_seconds'])} | |",
           f"| speed-up | {mmm(r['speedup'], '{:.2f}')} | {ok(r['speedup'])} |",
           f"| peak memory, dynlab / plain forward of the same row | {mmm(m['dynlab_over_plain'], '{:.2f}')} | "
           f"{ok(m)} |",
           f"| largest relative difference, any metric | {a['overall']:.2g} | {ok(a)} |",
           *([f"| FLOP/s over the same run's matmul peak | {c['fraction']:.2f} "
              f"({c['achieved_flops'] / 1e9:.1f} of {c['matmul_peak_flops']['median'] / 1e9:.1f} GFLOP/s) | "
              f"{ok(c) if 'pass' in c else 'not set on CUDA'} |"]
             if (c := r.get("hardware_ceiling")) else []), "",
           "Largest relative difference per metric: "
           + ", ".join(f"{k} {v:.1g}" for k, v in a["max_relative_difference"].items()) + ".", "",
           "Peak memory per row (MiB): "
           + "; ".join(f"row {p['row']}: plain {p['plain_forward_mb']:.0f}, dynlab {p['dynlab_mb']:.0f}, "
                       f"paper {p['paper_mb']:.0f}" for p in m["per_row"]) + "."]
    return out


def scaling(r: dict) -> list[str]:
    p, t = r["probe"], r["train"]
    out = ["## 5. Scaling", "", machine_line(r["machine"]), "",
           "| what | x (tokens) | seconds | exponent vs x (vs tokens) |", "|---|---|---|---|"]
    for axis, what in (("prompts", f"probe evaluation vs prompts ({p['prompts']['types']} types)"),
                       ("types", f"probe evaluation vs types ({p['types']['prompts']} prompts)")):
        a = p[axis]
        out.append(f"| {what} | " + ", ".join(f"{x} ({n})" for x, n in zip(a["x"], a["tokens"])) + " | "
                   + ", ".join(mmm(s) for s in a["seconds"])
                   + f" | {a['exponent']:.2f} ({a['exponent_vs_tokens']:.2f}) |")
    out.append(f"| DPO step vs sequence length ({t['model']}, {t['sequences']} sequences) | "
               + ", ".join(str(n) for n in t["lengths"]) + " | " + ", ".join(mmm(s) for s in t["step_seconds"])
               + f" | {t['exponent']:.2f} |")
    return out


def before_after(r: dict) -> list[str]:
    out = ["## Before / after the fixes (one process, the two code paths alternated)", "", machine_line(r["machine"]),
           "", f"Model {r['settings']['model']}; `python -m benchmarks.before_after`.", "",
           "| what | before (s) | after (s) | speed-up |", "|---|---|---|---|"]
    for key, what in (("dpo_step", "DPO step: concatenated (2B, T) forward -> shared prompt + length groups"),
                      ("sft_step", "SFT step: one padded forward -> length groups"),
                      ("probe_evaluation", "probe evaluation, embedded default: row by row -> rows batched")):
        if key in r:
            q = r[key]
            out.append(f"| {what} | {mmm(q['before_seconds'])} | {mmm(q['after_seconds'])} | "
                       f"{mmm(q['speedup'], '{:.2f}')} |")
    return out


def lora(r: dict) -> list[str]:
    s = r["settings"]
    out = ["## LoRA DPO (dynlab LoRA vs full-weight DPO vs TRL DPOTrainer + peft)", "", machine_line(r["machine"]), "",
           f"LoRA r {s['r']}, alpha {s['alpha']:g}, dropout {s['lora_dropout']:g}, target_modules "
           f"{s['target_modules']} in both dynlab and TRL; batches of {s['pairs']} DPO pairs of at most "
           f"{s['max_length']} tokens; {s['rounds']} rounds x {s['steps']} timed steps per system after "
           f"{s['warmup']} warm-up step(s), each (system, round) in a fresh process. Memory: {s['memory']}. "
           f"Targets: dynlab LoRA / TRL+peft tokens/s >= 1.5; dynlab LoRA / full DPO peak memory <= 0.6.", "",
           "| model | system | trainable params | step s | tokens/s | RSS after load MiB | peak RSS MiB | "
           "training adds MiB | first loss |", "|---|---|---|---|---|---|---|---|---|"]
    for key, run in r["runs"].items():
        for name, sysr in run["systems"].items():
            gpu = f" (GPU {mmm(sysr['cuda_peak_mb'], '{:.0f}')})" if "cuda_peak_mb" in sysr else ""
            out.append(f"| {key} ({run['parameters'] / 1e6:.1f}M) | {name} | {sysr['trainable_parameters']:,} | "
                       f"{mmm(sysr['step_seconds'])} | {mmm(sysr['tokens_per_second'], '{:.0f}')} | "
                       f"{mmm(sysr['rss_after_load_mb'], '{:.0f}')} | {mmm(sysr['peak_rss_mb'], '{:.0f}')}{gpu} | "
                       f"{mmm(sysr['training_adds_rss_mb'], '{:.0f}')} | {run['first_step_loss'][name]:.6g} |")
    for key, run in r["runs"].items():
        inits = {name: sysr["lora_init"] for name, sysr in run["systems"].items() if sysr["lora_init"]["matrices"]}
        if len(inits) == 2:
            a, b = inits.values()
            out += ["", f"{key}: the LoRA A matrices at init are {'identical' if a == b else '**different**'} in "
                        f"{' and '.join(inits)} ({a['matrices']} matrices, sum {a['sum']:.8g} / {b['sum']:.8g})."]
    out += ["", "| model | figure | value | target |", "|---|---|---|---|"]
    for key, run in r["runs"].items():
        for field, what in (("lora_over_trl_tokens_per_second", "dynlab LoRA / TRL+peft, tokens/s"),
                            ("lora_over_full_peak_memory", f"dynlab LoRA / full DPO, peak memory "
                                                           f"({run['memory_target_reads']})"),
                            ("lora_over_full_step_seconds", "dynlab LoRA / full DPO, step time (context)")):
            if field in run:
                q = run[field]
                out.append(f"| {key} | {what} | {mmm(q, '{:.2f}')} | {ok(q) if 'pass' in q else ''} |")
    return out


def sampling(r: dict) -> list[str]:
    s = r["settings"]
    out = ["## Sampling (dynlab generation vs plain `model.generate`; on-policy step split; SimPO memory)", "",
           machine_line(r["machine"]), "",
           f"`python -m benchmarks.sampling`. Generation: {s['prompts']} HH prompts (cut to {s['max_prompt_length']} "
           f"tokens) in one batch, temperature {s['temperature']:g}, top_p {s['top_p']:g}, top_k off, "
           f"{s['max_new_tokens']} new tokens at most, KV cache on, the same torch seed in both; {s['repeats']} "
           f"alternated rounds after an untimed greedy call of each. Tokens: {s['generated_tokens']}. Step: "
           f"{s['pairs']} DPO pairs, sampling = `DPOModule.sample_negatives`, training = `training_step` + backward "
           f"+ clip + AdamW; {s['steps']} alternated rounds after {s['warmup']} untimed. Memory: {s['memory']}, "
           f"{s['memory_rounds']} fresh process(es) per loss type.", ""]
    runs = r["runs"]
    gen = {k: v["generate"] for k, v in runs.items() if "generate" in v}
    if gen:
        out += ["| model | system | generated tokens | seconds | tokens/s | dynlab / plain | target |",
                "|---|---|---|---|---|---|---|"]
        for key, g in gen.items():
            for name, sysr in g["systems"].items():
                q = g["dynlab_over_plain"]
                ratio, target = (mmm(q, "{:.2f}"), ok(q)) if name == "plain" else ("", "")
                out.append(f"| {key} | {name} | {mmm(sysr['generated_tokens'], '{:.0f}')} | {mmm(sysr['seconds'])} | "
                           f"{mmm(sysr['tokens_per_second'], '{:.1f}')} | {ratio} | {target} |")
        out += [""] + [f"{key}: dynlab and plain `model.generate` give "
                       + ("identical" if g["identical_tokens"]["greedy"] else "**different**") + " tokens greedy, "
                       + ("identical" if g["identical_tokens"]["sampled"] else "**different**")
                       + " tokens sampled with the same seed"
                       + (f"; from this process's CPU seconds (the other jobs' share of the cores left out) dynlab / "
                          f"plain is {mmm(g['dynlab_over_plain_cpu_time'], '{:.2f}')}"
                          if "dynlab_over_plain_cpu_time" in g else "") + "." for key, g in gen.items()] + [""]
    steps = {k: v["step"] for k, v in runs.items() if "step" in v}
    if steps:
        out += ["| model | sampling s | on-policy training s | on-policy step s | off-policy step s | "
                "on-policy / off-policy step | sampling share of the on-policy step | sampled tokens/s |",
                "|---|---|---|---|---|---|---|---|"]
        for key, st in steps.items():
            out.append(f"| {key} ({st['parameters'] / 1e6:.1f}M) | {mmm(st['sampling_seconds'])} | "
                       f"{mmm(st['on_policy_training_seconds'])} | {mmm(st['on_policy_step_seconds'])} | "
                       f"{mmm(st['off_policy_step_seconds'])} | "
                       f"{mmm(st['on_policy_over_off_policy_step'], '{:.2f}')} | "
                       f"{mmm(st['sampling_share_of_on_policy_step'], '{:.0%}')} | "
                       f"{mmm(st['sampled_tokens_per_second'], '{:.1f}')} |")
        out.append("")
    mems = {k: v["memory"] for k, v in runs.items() if "memory" in v}
    if mems:
        out += ["| model | loss type | reference models | RSS before the build MiB | peak RSS MiB | build adds MiB |",
                "|---|---|---|---|---|---|"]
        for key, m in mems.items():
            for lt, q in m["loss_types"].items():
                out.append(f"| {key} | {lt} | {q['references']} | {mmm(q['rss_start_mb'], '{:.0f}')} | "
                           f"{mmm(q['peak_rss_mb'], '{:.0f}')} | {mmm(q['build_adds_mb'], '{:.0f}')} |")
        out += ["", "| model | figure | value | target |", "|---|---|---|---|"]
        for key, m in mems.items():
            q = m["simpo_over_sigmoid_build_adds"]
            out += [f"| {key} | simpo builds no reference model | {'yes' if m['simpo_has_no_reference'] else '**no**'}"
                    f" | |",
                    f"| {key} | simpo / sigmoid, peak RSS of the process | "
                    f"{mmm(m['simpo_over_sigmoid_peak_rss'], '{:.2f}')} | |",
                    f"| {key} | simpo / sigmoid, what the build adds (policy weights {m['policy_weights_mb']:.0f} MiB) "
                    f"| {mmm(q, '{:.2f}')} | {ok(q)} |"]
    return out


RENDERERS = {"train_throughput": throughput, "probe_overhead": overhead, "probe_vs_paper": versus_paper,
             "scaling": scaling, "lora": lora, "sampling": sampling, "before_after": before_after}


def render(results: Path) -> str:
    lines = ["# dynlab benchmarks", "", "Written by `make bench` (`python -m benchmarks.run_all`); every figure is "
             "median (min–max). Times are wall seconds on a shared machine, so read the ratios, measured in one "
             "process with the systems alternated.", ""]
    found: dict[str, Any] = {}
    for name in RENDERERS:
        path = results / f"{name}.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    for name in ("train_throughput", "probe_overhead", "probe_vs_paper", "scaling", "lora", "sampling", "before_after"):
        if name in found:
            lines += RENDERERS[name](found[name]) + [""]
    notes = results / "NOTES.md"  # the hand-written reading of the figures
    if notes.is_file():
        lines += [notes.read_text()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    out = args.results / "RESULTS.md"
    out.write_text(render(args.results))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
