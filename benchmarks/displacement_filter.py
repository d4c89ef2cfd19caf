"""Does normalised CHES predict likelihood displacement, and does ``data.drop_most_displacing`` reduce it? Measured on
the embedded default (configs/dpo.yaml: off-policy DPO of SmolLM2-135M-Instruct on the synthetic preference set).

    python -m benchmarks.displacement_filter [--num-train 96] [--max-steps 24] [--quick]
        (about 9 minutes at 1 thread on a shared 2-core CPU; --quick, the slow test's size: about 4; not in make bench)

Two ``dynlab fit`` runs as subprocesses, from the same start (the instruct model itself, as the embedded default;
not an SFT export), with the same seed, lr, batches of 4 and step budget: (a) unfiltered, (b)
``data.drop_most_displacing=0.25``. The default size is the embedded default's own: its 96 training pairs and 24
steps (one epoch of the unfiltered set, 1.33 of the filtered one). probe_train covers every training pair
(``probe_train_size = num_train``; in (b) the kept ones) and probe_test the held-out rows, probe types ``chosen`` and
``rejected`` only (CHES needs no other), evaluated at step 0 and the last step.

Reported (``benchmarks/results/displacement_filter.json``):

- ``correlation``: per probe pair of run (a), the step-0 ``ches_norm`` against the final Δlog π(y⁺) (the chosen
  ``dlogp`` at the last step): Pearson r (with its Fisher-z 95% interval), Spearman ρ and n, for probe_train and
  probe_test. Razin et al. 2024 predict a negative r (a higher CHES, a larger drop of the chosen response).
- ``filter``: the pairs (b) dropped (``dropped_pairs.jsonl``) against the top ⌊0.25·N⌋ by (a)'s step-0 ``ches_norm``
  (the probe evaluation's own CHES, a second code path), and the largest relative difference of their scores.
- ``dlogp``: the mean final Δlog π of ``chosen`` and ``rejected`` of each run on probe_train (for (a) also on its
  kept and its dropped pairs) and probe_test, and the difference filtered − unfiltered with its standard error,
  paired by prompt: on probe_test (the same held-out prompts in both runs) and on the kept training pairs (in both
  runs' probe_train). A positive chosen difference: filtering left y⁺ less displaced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.common import REPO, add_common_args, machine_info, setup_torch, write_result

CONFIG = REPO / "configs" / "dpo.yaml"
QUICK = {"num_train": 32, "max_steps": 8, "probe_test_size": 16}  # the slow test's size


# ---- the runs -------------------------------------------------------------------------------------------------------
def fit_args(num_train: int, max_steps: int, probe_test_size: int, drop: float, device: str = "cpu") -> list[str]:
    """``dynlab fit`` arguments of one run: the embedded default with probe_train over every training pair, two probe
    types, evaluations at step 0 and the last step only, no training checkpoints."""
    args = ["fit", "--config", str(CONFIG), f"--data.init_args.num_train={num_train}",
            f"--data.init_args.probe_train_size={num_train}", f"--data.init_args.probe_test_size={probe_test_size}",
            "--data.init_args.probe_types=[chosen, rejected]", f"--trainer.max_steps={max_steps}",
            f"--model.init_args.probe_every_n_steps={max_steps}", "--trainer.callbacks=[]",
            f"--trainer.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}"]
    if drop:
        args.append(f"--data.init_args.drop_most_displacing={drop}")
    return args


def fit(workdir: Path, name: str, args: list[str], threads: int, timeout: float = 1800) -> tuple[Path, float]:
    """One ``dynlab fit`` subprocess in ``workdir`` (its run directory ``runs/dpo/NAME``); its output goes to
    ``workdir/NAME.log``. Returns the run directory and the seconds it took."""
    env = {**os.environ, "DYNLAB_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "DYNLAB_RUN_VERSION": name,
           "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dynlab.cli", *args], cwd=workdir, env=env, text=True,
                          capture_output=True, timeout=timeout)
    seconds = time.monotonic() - start
    (workdir / f"{name}.log").write_text(proc.stdout + "\n---- stderr ----\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"dynlab fit ({name}) failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("dynlab: run directory: "))
    return workdir / line.removeprefix("dynlab: run directory: ").split()[0], seconds


def run_pair(workdir: Path, num_train: int, max_steps: int, probe_test_size: int, drop: float = 0.25,
             threads: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Runs (a) unfiltered and (b) filtered, one after the other; ``{"unfiltered": dir, "filtered": dir,
    "seconds": {...}}``."""
    runs: dict[str, Any] = {"seconds": {}}
    for name, fraction in (("unfiltered", 0.0), ("filtered", drop)):
        print(f"displacement_filter: fitting {name} ({num_train} pairs, {max_steps} steps)", flush=True)
        runs[name], runs["seconds"][name] = fit(workdir, name, fit_args(num_train, max_steps, probe_test_size,
                                                                        fraction, device), threads)
    return runs


# ---- the figures ----------------------------------------------------------------------------------------------------
def per_pair(run: Path, split: str) -> pd.DataFrame:
    """One row per probe pair of ``split``, indexed by prompt text: ``row``, the step-0 ``ches_norm`` and the final
    ``dlogp`` of chosen and rejected."""
    frame = read_trajectory_of(run)
    frame = frame[frame["split"] == split]
    last = int(frame["step"].max())
    if last == 0:
        raise ValueError(f"{run}: only a step-0 evaluation; no Δlog π to correlate")
    chosen0 = frame[(frame["step"] == 0) & (frame["type"] == "chosen")].set_index("row")
    out = pd.DataFrame({"ches_norm": chosen0["ches_norm"]})
    for t in ("chosen", "rejected"):
        out[f"dlogp_{t}"] = frame[(frame["step"] == last) & (frame["type"] == t)].set_index("row")["dlogp"]
    prompts = [json.loads(line)["prompt"] for line in (run / "probes" / f"probe_{split}.jsonl").read_text(
        encoding="utf-8").splitlines()]
    out = out.sort_index()
    assert list(out.index) == list(range(len(prompts))), (run, split)
    return out.reset_index().set_index(pd.Index(prompts, name="prompt"))


def read_trajectory_of(run: Path) -> pd.DataFrame:
    from dynlab.tracking.trajectory import read_trajectory

    return read_trajectory(run)


def correlation(x: pd.Series, y: pd.Series) -> dict[str, Any]:
    """Pearson r with its Fisher-z 95% interval, Spearman ρ (Pearson of the average ranks) and n."""
    n = len(x)
    r = float(x.corr(y))
    rho = float(x.rank().corr(y.rank()))
    half = 1.96 / math.sqrt(n - 3) if n > 3 else math.inf
    z = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
    return {"n": n, "pearson": r, "pearson_ci95": [math.tanh(z - half), math.tanh(z + half)], "spearman": rho}


def mean_se(values: pd.Series) -> dict[str, float]:
    """Mean, its standard error (sample s.d. / √n) and n."""
    n = len(values)
    return {"mean": float(values.mean()), "se": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
            "n": n}


def measure(unfiltered: Path, filtered: Path, drop: float = 0.25) -> dict[str, Any]:
    """The figures of the module docstring from the two run directories."""
    a = {s: per_pair(unfiltered, s) for s in ("train", "test")}
    b = {s: per_pair(filtered, s) for s in ("train", "test")}
    result: dict[str, Any] = {"correlation": {}, "correlation_filtered_run": {}}
    for split in ("train", "test"):
        result["correlation"][split] = correlation(a[split]["ches_norm"], a[split]["dlogp_chosen"])
        result["correlation_filtered_run"][split] = correlation(b[split]["ches_norm"], b[split]["dlogp_chosen"])

    # the filter: (b)'s dropped training pairs against (a)'s step-0 probe scores (probe_train row i = training row i)
    listed = [json.loads(line) for line in (filtered / "dropped_pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    train_a = a["train"].reset_index()
    k = int(drop * len(train_a))
    top = train_a.sort_values("ches_norm", ascending=False, kind="stable")["row"].head(k).tolist()
    rel = [abs(d["ches_norm"] - train_a.loc[d["index"], "ches_norm"]) / abs(train_a.loc[d["index"], "ches_norm"])
           for d in listed]
    dropped_prompts = {d["prompt"] for d in listed}
    result["filter"] = {
        "pairs": len(train_a), "fraction": drop, "dropped": len(listed), "expected": k,
        "dropped_indices": [d["index"] for d in listed], "top_by_step0_probe_ches_norm": top,
        "same_pairs": sorted(d["index"] for d in listed) == sorted(top),
        "prompts_match": all(train_a.loc[d["index"], "prompt"] == d["prompt"] for d in listed),
        "max_rel_diff_ches_norm": max(rel) if rel else 0.0,
        "dropped_ches_norm_mean": float(pd.Series([d["ches_norm"] for d in listed]).mean()) if listed else math.nan,
        "kept_ches_norm_mean": float(train_a[~train_a["prompt"].isin(dropped_prompts)]["ches_norm"].mean()),
        "filtered_probe_train_has_no_dropped_pair": not (set(b["train"].index) & dropped_prompts),
    }

    kept = a["train"][~a["train"].index.isin(dropped_prompts)]
    dropped = a["train"][a["train"].index.isin(dropped_prompts)]
    dlogp: dict[str, Any] = {}
    for t in ("chosen", "rejected"):
        col = f"dlogp_{t}"
        common = b["train"].index.intersection(kept.index)
        test_common = a["test"].index.intersection(b["test"].index)
        dlogp[t] = {
            "unfiltered": {"train": mean_se(a["train"][col]), "train_kept": mean_se(kept[col]),
                           "train_dropped": mean_se(dropped[col]), "test": mean_se(a["test"][col])},
            "filtered": {"train": mean_se(b["train"][col]), "test": mean_se(b["test"][col])},
            "filtered_minus_unfiltered": {
                "test_paired": mean_se(b["test"].loc[test_common, col] - a["test"].loc[test_common, col]),
                "train_kept_paired": mean_se(b["train"].loc[common, col] - kept.loc[common, col]),
                "train_own": float(b["train"][col].mean() - a["train"][col].mean()),
            },
        }
    result["dlogp"] = dlogp
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    c, d = result["correlation"], result["dlogp"]["chosen"]
    lines = [f"{split}: ches_norm(0) vs Δlog π(y⁺): Pearson {c[split]['pearson']:+.3f} "
             f"[{c[split]['pearson_ci95'][0]:+.3f}, {c[split]['pearson_ci95'][1]:+.3f}], Spearman "
             f"{c[split]['spearman']:+.3f}, n {c[split]['n']}" for split in ("train", "test")]
    f = result["filter"]
    lines.append(f"filter: dropped {f['dropped']}/{f['pairs']} (expected {f['expected']}), the top by step-0 probe "
                 f"ches_norm: {f['same_pairs']}")
    for split in ("train", "test"):
        lines.append(f"Δlog π(y⁺) {split}: unfiltered {d['unfiltered'][split]['mean']:+.4f}, filtered "
                     f"{d['filtered'][split]['mean']:+.4f}")
    for key, diff in d["filtered_minus_unfiltered"].items():
        if isinstance(diff, dict):
            lines.append(f"filtered − unfiltered, {key}: {diff['mean']:+.4f} ± {diff['se']:.4f} (n {diff['n']})")
    return lines


def main(argv: Sequence[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--num-train", type=int, default=96, help="training pairs (all of them probed)")
    parser.add_argument("--max-steps", type=int, default=24, help="optimizer steps of each run (batches of 4)")
    parser.add_argument("--probe-test-size", type=int, default=32, help="held-out probe prompts")
    parser.add_argument("--drop", type=float, default=0.25, help="run (b)'s data.drop_most_displacing")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the runs go (kept); default: a temporary directory, removed at the end")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.max_steps, args.probe_test_size = QUICK.values()
    setup_torch(args)
    threads = args.threads or 1
    info = machine_info(args)
    settings = {"start": "SmolLM2-135M-Instruct (the embedded default's own start; no SFT export)",
                "config": "configs/dpo.yaml", "num_train": args.num_train, "max_steps": args.max_steps,
                "batch_size": 4, "lr": 5e-6, "beta": 0.1, "max_length": 128, "seed": 0, "drop_most_displacing":
                args.drop, "probe_train_size": args.num_train, "probe_test_size": args.probe_test_size,
                "probe_types": ["chosen", "rejected"], "subprocess_threads": threads}
    with tempfile.TemporaryDirectory(prefix="displacement_filter-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = run_pair(workdir, args.num_train, args.max_steps, args.probe_test_size, args.drop, threads, args.device)
        result = {"benchmark": "displacement_filter", "machine": info, "settings": settings,
                  **measure(runs["unfiltered"], runs["filtered"], args.drop), "fit_seconds": runs["seconds"]}
    for line in summary_lines(result):
        print(line, flush=True)
    write_result(args.out, "displacement_filter", result)
    return result


if __name__ == "__main__":
    main()
