"""``dynlab reproduce`` (``make reproduce``): the paper's picture on real preference data, at CPU scale, in one command.

Four ``dynlab fit`` stages on the embedded default model (PAPER_NOTES §6-7): SFT on chosen and ExtendSFT (SFT on
chosen and rejected) from the same start, each for several passes over a small training subset, then the same
off-policy DPO from each stage-1 export. Then the §9 signatures of the four runs (``dynlab.evaluation.signatures``),
one HTML report (``dynlab report``) and the wall time split into training, probe evaluation, export and report.

    dynlab reproduce [--data FILE] [--out runs/reproduce] [--config OVERLAY ...] [-- EXTRA FIT ARGS]
    dynlab reproduce --scale paper      (configs/paper/: Pythia-410M on 5,000 HH pairs, on a GPU)

Each stage runs in a fixed run directory under ``--out``: rerunning the same command reuses finished stages and
resumes an interrupted one from its ``last.ckpt``. A stage whose arguments changed since it ran is refused (rerun with
``--fresh``), so one report never mixes runs of two recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dynlab.errors import InputError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/hh_probe/probe_test.jsonl"
RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class Stage:
    name: str  # the role the signatures know it by
    base: str  # the shipped config it stacks on (configs/<base>.yaml)
    run: str  # its run directory under --out: <logger name>/<fixed version>
    parent: str | None = None  # the stage whose export it starts from


STAGES = (
    Stage("sft", "sft", "sft/reproduce"),
    Stage("extend", "extend_sft", "extend_sft/reproduce"),
    Stage("dpo", "dpo", "dpo/from-sft", parent="sft"),
    Stage("dpo_extend", "dpo", "dpo/from-extend", parent="extend"),
)


def stage_configs(stage: Stage, configs: Path, scale: str, sizes: Path | None = None) -> list[Path]:
    """The configs one stage stacks: at ``cpu`` scale the shipped embedded-default config, the recipe's data and the
    recipe's stage overlay; at ``paper`` scale the paper's config of that stage (configs/paper/, for GPUs). Then,
    from a ``sizes`` directory, its ``data.yaml`` and ``<stage>.yaml`` where present (e.g. configs/reproduce/quick/)."""
    if scale == "paper":
        stacked = [configs / "paper" / f"{stage.base}.yaml"]
    else:
        stacked = [configs / f"{stage.base}.yaml", configs / "reproduce" / "data.yaml",
                   configs / "reproduce" / f"{stage.base}.yaml"]
    if sizes is not None:
        stacked += [p for p in (sizes / "data.yaml", sizes / f"{stage.base}.yaml") if p.is_file()]
    return stacked


def stage_command(stage: Stage, configs: Path, scale: str, data: str | None, out: Path, overlays: Sequence[str],
                  extra: Sequence[str], sizes: Path | None = None) -> list[str]:
    """The ``dynlab fit`` arguments of one stage (without the interpreter and without ``--ckpt_path``)."""
    args = ["fit"]
    for config in [*map(str, stage_configs(stage, configs, scale, sizes)), *overlays]:
        args += ["--config", config]
    if data is not None:
        args.append(f"--data.init_args.source={data}")
    args.append(f"--trainer.default_root_dir={out}")
    if stage.parent is not None:
        parent = next(s for s in STAGES if s.name == stage.parent)
        args.append(f"--model.init_args.init_from={out / parent.run / 'export'}")
    return [*args, *extra]


def finished(run_dir: Path) -> bool:
    """A stage is done once its export is whole (the export is written to a temporary directory and renamed)."""
    return (run_dir / "export" / "config.json").is_file()


def run_stage(stage: Stage, args: list[str], out: Path, env: dict[str, str]) -> tuple[str, float]:
    """Run (or resume, or reuse) one stage; returns what was done and its wall time in seconds."""
    run_dir = out / stage.run
    if finished(run_dir):
        return "reused", 0.0
    resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # started but never checkpointed: its rows would be mixed with the new run's
    command = [sys.executable, "-m", "dynlab.cli", *args, *(["--ckpt_path=last"] if resume else [])]
    print(f"dynlab reproduce: {'resuming' if resume else 'running'} {stage.name} in {run_dir}", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, env={**env, "DYNLAB_RUN_VERSION": run_dir.name})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        # 143/130: stopped by a signal; rerunning the same command resumes from the last checkpoint
        raise SystemExit(f"dynlab reproduce: stage {stage.name} exited {proc.returncode}; rerun the same command to "
                         "resume it" if proc.returncode in (130, 143) else
                         f"dynlab reproduce: stage {stage.name} failed (exit {proc.returncode}): {' '.join(command)}")
    return ("resumed" if resume else "ran"), wall


def check_recipe(out: Path, commands: dict[str, list[str]], fresh: bool) -> None:
    """Refuse to mix runs of two recipes: the arguments of every stage are kept in ``OUT/recipe.json``."""
    path = out / RECIPE_FILE
    if fresh:
        for stage in STAGES:
            shutil.rmtree(out / stage.run, ignore_errors=True)
        for name in (RECIPE_FILE, "timing.json", "report.html"):
            (out / name).unlink(missing_ok=True)
    elif path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = [name for name, args in commands.items() if name in before and before[name] != args]
        started = [s.name for s in STAGES if s.name in changed and (out / s.run).exists()]
        if started:
            raise InputError(f"the arguments of stage(s) {', '.join(started)} differ from the runs already in {out}: "
                             "rerun with --fresh, or choose another --out", file=path)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(commands, indent=1) + "\n", encoding="utf-8")


def timing_split(out: Path, walls: dict[str, float], report_s: float) -> dict:
    """Wall time per stage and summed over stages, split into training, probe evaluation and export (each run's
    ``timing.json``), plus the report. A reused stage counts the time it took when it ran."""
    stages = {}
    for stage in STAGES:
        path = out / stage.run / "timing.json"
        timing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        stages[stage.name] = {**timing, "wall_s": walls.get(stage.name) or timing.get("total_s", 0.0)}
    total = {key: round(sum(s.get(key, 0.0) for s in stages.values()), 1)
             for key in ("train_s", "probe_eval_s", "export_s", "wall_s")}
    total["report_s"] = round(report_s, 1)
    total["wall_s"] = round(total["wall_s"] + report_s, 1)
    # what the figures depend on: the CPUs, the threads each stage used (1 is faster on a busy machine) and the load
    machine = {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "DYNLAB_THREADS": os.environ.get("DYNLAB_THREADS"),
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    return {"stages": stages, "total": total, "machine": machine}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="dynlab reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help=f"preference rows in any format dynlab reads (default at cpu scale: "
                        f"{DEFAULT_DATA}, 500 HH helpful-base rows; at paper scale: the configs' hub dataset)")
    parser.add_argument("--scale", choices=("cpu", "paper"), default="cpu",
                        help="cpu: the embedded default on 40 pairs (configs/reproduce/); paper: the paper's models, "
                        "data and budgets (configs/paper/, a GPU and the hub)")
    parser.add_argument("--out", default="runs/reproduce", help="where the runs, report.html and timing.json go")
    parser.add_argument("--sizes", help="a directory of per-stage overlays stacked on the recipe: data.yaml and "
                        "<stage>.yaml (sft, extend_sft, dpo) where present; configs/reproduce/quick is a 15-minute one")
    parser.add_argument("--config", action="append", default=[], dest="overlays",
                        help="a config stacked on every stage (repeatable), e.g. a reduced size")
    parser.add_argument("--configs", default=str(REPO / "configs"), help="the directory of the shipped configs")
    parser.add_argument("--fresh", action="store_true", help="delete this recipe's runs in --out and start over")
    args = parser.parse_args(argv)

    out, configs = Path(args.out).resolve(), Path(args.configs)
    data = args.data if args.data is not None or args.scale == "paper" else DEFAULT_DATA
    if data is not None and Path(data).exists():
        data = str(Path(data).resolve())
    elif data is not None and not (len(data.split("/")) == 2 and not data.startswith((".", "/"))):  # a hub id
        raise InputError("no such file (pass --data FILE, or DATA=FILE to make reproduce)", file=data)
    sizes = None if args.sizes is None else Path(args.sizes).resolve()
    if sizes is not None and not sizes.is_dir():
        raise InputError("no such directory", file=args.sizes, field="--sizes")
    for stage in STAGES:
        for config in stage_configs(stage, configs, args.scale, sizes):
            if not config.is_file():
                raise InputError("missing config (pass --configs DIR, the repository's configs/)", file=config)
    overlays = [str(Path(o).resolve()) for o in args.overlays]
    for overlay in overlays:
        if not Path(overlay).is_file():
            raise InputError("no such config", file=overlay)
    commands = {s.name: stage_command(s, configs, args.scale, data, out, overlays, extra, sizes) for s in STAGES}
    check_recipe(out, commands, args.fresh)

    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")  # four runs in one recipe: W&B only when asked for
    walls = {}
    for stage in STAGES:
        what, walls[stage.name] = run_stage(stage, commands[stage.name], out, env)
        if what == "reused":
            print(f"dynlab reproduce: {stage.name} already finished in {out / stage.run}", file=sys.stderr)

    from dynlab.evaluation.html_report import main as report_main
    from dynlab.evaluation.signatures import check_signatures, signature_table

    run_dirs = [out / s.run for s in STAGES]
    start = time.perf_counter()
    report_main([*map(str, run_dirs), "--out", str(out / "report.html")])
    report_s = time.perf_counter() - start
    timing = timing_split(out, walls, report_s)
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n", encoding="utf-8")

    for split in ("train", "test"):
        print(f"\nsignatures (PAPER_NOTES §9) on probe_{split}:\n{signature_table(check_signatures(run_dirs, split))}")
    t = timing["total"]
    print(f"\nwall time {t['wall_s']:.0f} s: training {t['train_s']:.0f} s, "
          f"probe evaluation {t['probe_eval_s']:.0f} s, export {t['export_s']:.0f} s, report {t['report_s']:.0f} s "
          f"(per stage: {out / 'timing.json'})")
    print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        print(f"dynlab: error: {err}", file=sys.stderr)
        sys.exit(2)
