"""Run a W&B sweep YAML without a W&B server, on W&B's own open-source sweep engine (PyPI ``sweeps``): each trial is
a ``dynlab fit`` subprocess with the swept arguments; results go to a summary table.

    dynlab sweep sweeps/dpo_lr_epochs.yaml --count 6 [--config configs/tiny.yaml]

The same YAML runs unchanged under ``wandb sweep`` + ``wandb agent``. ``--count`` is the total number of trials of
the sweep: run the same command again after an interruption and it continues where it stopped (finished trials are
kept and passed to the search; failed ones are tried again).
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dynlab.errors import InputError

SUMMARY_FIXED = ("trial", "state", "metric", "metric_name", "run_dir", "wall_s")


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """A sweep YAML, validated against W&B's sweep schema (InputError naming the file otherwise)."""
    from sweeps import schema_violations_from_proposed_config

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"cannot read sweep: {err}".splitlines()[0], file=str(path)) from err
    violations = schema_violations_from_proposed_config(config)
    if violations:
        raise InputError(f"not a valid W&B sweep: {violations[0]}", file=str(path))
    if "${args}" not in config.get("command", []):
        raise InputError("the sweep's command must pass ${args} to dynlab fit", file=str(path), field="command")
    return config


def trial_command(config: dict[str, Any], params: dict[str, Any], overlays: Sequence[str] = ()) -> list[str]:
    """The sweep's ``command`` with W&B's macros expanded for a local run: ``${env}`` dropped, ``dynlab`` run with
    this Python, ``${args}`` -> ``--key=value``; ``--config`` overlays go right after the command's own configs."""
    out: list[str] = []
    configs_end = max((i + 2 for i, part in enumerate(config["command"]) if part == "--config"), default=None)
    for i, part in enumerate(config["command"]):
        if i == configs_end:
            for overlay in overlays:
                out += ["--config", overlay]
        if part == "${env}":
            continue
        if part in ("dynlab", "${program}"):
            out += [sys.executable, "-m", "dynlab.cli"]
        elif part == "${interpreter}":
            out.append(sys.executable)
        elif part == "${args}":
            out += [f"--{key}={value}" for key, value in params.items()]
        else:
            out.append(part)
    return out


def logged_metrics(run_dir: Path) -> list[str]:
    """The metric names a run's metrics.csv has a column for."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [k for k in next(csv.reader(f), []) if k not in ("step", "epoch")]


def check_metric_logged(run_dir: Path, metric: str, sweep: str | os.PathLike) -> None:
    """A sweep scored on a metric no run logs would score every trial NaN: refuse it, naming the close names."""
    logged = logged_metrics(run_dir)
    if metric not in logged:
        close = difflib.get_close_matches(metric, logged, n=3, cutoff=0.6)
        raise InputError(f"the trial's run logged no metric {metric!r}"
                         + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + f"; its {len(logged)} metrics are the columns of {run_dir / 'metrics.csv'}",
                         file=str(sweep), field="metric.name")


def last_value(run_dir: Path, metric: str) -> float:
    """The last logged value of ``metric`` in a run's metrics.csv (NaN if never logged)."""
    value = math.nan
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(metric):
                value = float(row[metric])
    return value


def read_summary(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_summary(path: Path, rows: list[dict[str, Any]], param_names: Sequence[str]) -> None:
    """Rewrite the summary CSV atomically (a killed sweep never leaves half a table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".summary-")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*SUMMARY_FIXED, *param_names])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _parse(value: str) -> Any:
    return yaml.safe_load(value) if value != "" else None


def run_sweep(path: str | os.PathLike, count: int, overlays: Sequence[str] = (), out_dir: str | None = None,
              cwd: str | os.PathLike | None = None, root: str | None = None) -> list[dict[str, Any]]:
    """Run trials until the sweep has ``count`` finished ones (or its grid is exhausted); returns the summary rows.
    ``root`` is every trial's ``trainer.default_root_dir`` and holds the summary (``<root>/sweeps/<name>``)."""
    from sweeps import RunState, SweepRun, next_run

    if count < 1:
        raise InputError(f"{count} trials: give --count 1 or more (the sweep's total number of trials)",
                         field="--count")
    config = load_sweep(path)
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    params = list(config["parameters"])
    out = Path(out_dir or Path(root or "runs") / "sweeps" / Path(path).stem)
    extra = [] if root is None else [f"--trainer.default_root_dir={root}"]
    summary_path = out / "summary.csv"
    rows = [r for r in read_summary(summary_path) if r["state"] == "finished"]  # failed trials are retried
    rescored = False
    for row in rows:
        row.update(trial=int(row["trial"]), metric=float(row["metric"]))
        if row.get("metric_name") != metric:  # scored under another metric (or by an older dynlab): score it again
            run = Path(cwd or ".") / (row.get("run_dir") or "")
            if not row.get("run_dir") or not (run / "metrics.csv").is_file():
                raise InputError(f"trial {row['trial']} was scored on {row.get('metric_name') or 'an unnamed metric'}"
                                 f" and its run {run} is gone, so it cannot be scored on {metric}: give --out for a "
                                 "new summary", file=str(summary_path))
            check_metric_logged(run, metric, path)
            row.update(metric=last_value(run, metric), metric_name=metric)
            print(f"dynlab sweep: trial {row['trial']}: scored again on {metric} from {run}", flush=True)
            rescored = True
    if rescored:
        write_summary(summary_path, rows, params)
    # every trial gets a run directory of its own: a fixed one from the caller's environment would be shared
    env = {k: v for k, v in os.environ.items() if k != "DYNLAB_RUN_VERSION"}
    if "DYNLAB_RUN_VERSION" in os.environ:
        print("dynlab sweep: ignoring DYNLAB_RUN_VERSION (each trial gets its own version_N)", file=sys.stderr)
    while len(rows) < count:
        history = [SweepRun(name=str(r["trial"]), state=RunState.finished,
                            config={p: {"value": _parse(str(r[p]))} for p in params},
                            summary_metrics={metric: r["metric"]}) for r in rows]
        suggestion = next_run(config, history, validate=True)
        if suggestion is None:  # a grid with every point done
            break
        values = {p: suggestion.config[p]["value"] for p in params}
        trial = max([r["trial"] for r in rows], default=-1) + 1
        print(f"dynlab sweep: trial {trial}: {values}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([*trial_command(config, values, overlays), *extra], cwd=cwd, text=True,
                              capture_output=True, env=env)
        wall = time.perf_counter() - start
        run_dir, value, state = "", math.nan, "failed"
        if proc.returncode == 0:
            line = next(x for x in proc.stdout.splitlines() if x.startswith("dynlab: run directory: "))
            run_dir = line.removeprefix("dynlab: run directory: ").split()[0]
            try:
                check_metric_logged(Path(cwd or ".") / run_dir, metric, path)
            except InputError:
                # kept as finished (its run is whole): a rerun with the metric's right name scores it from its run
                rows.append({"trial": trial, "state": "finished", "metric": math.nan, "metric_name": "",
                             "run_dir": run_dir, "wall_s": round(wall, 1), **values})
                write_summary(summary_path, rows, params)
                raise
            value, state = last_value(Path(cwd or ".") / run_dir, metric), "finished"
        else:
            print(proc.stderr[-2000:], file=sys.stderr)
        row = {"trial": trial, "state": state, "metric": value, "metric_name": metric, "run_dir": run_dir,
               "wall_s": round(wall, 1), **values}
        print(f"dynlab sweep: trial {trial}: {state}, {metric} = {value:.6g} ({wall:.0f} s)", flush=True)
        if state == "finished":
            rows.append(row)
        write_summary(summary_path, [*rows, *([] if state == "finished" else [row])], params)
        if state != "finished":
            raise RuntimeError(f"trial {trial} failed (exit {proc.returncode}); see the log above")
    print_summary(rows, metric, goal, params, summary_path)
    return rows


def print_summary(rows: list[dict[str, Any]], metric: str, goal: str, params: Sequence[str], path: Path) -> None:
    print(f"\n{'trial':>5}  {metric:>28}  " + "  ".join(f"{p:>36}" for p in params))
    for r in rows:
        print(f"{r['trial']:>5}  {r['metric']:>28.6g}  " + "  ".join(f"{str(r[p]):>36}" for p in params))
    done = [r for r in rows if not math.isnan(r["metric"])]
    if done:
        best = (max if goal == "maximize" else min)(done, key=lambda r: r["metric"])
        print(f"\nbest trial {best['trial']}: {metric} = {best['metric']:.6g} with "
              + ", ".join(f"{p}={best[p]}" for p in params) + f"  ({best['run_dir']})")
    print(f"summary: {path}")
