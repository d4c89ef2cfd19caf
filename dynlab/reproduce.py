"""``dynlab reproduce`` (``make reproduce``): the paper's picture on real preference data, at CPU scale, in one command.

Four ``dynlab fit`` stages on the embedded default model (PAPER_NOTES §6-7): SFT on chosen and ExtendSFT (SFT on
chosen and rejected) from the same start, each for several passes over a small training subset, then the same
off-policy DPO from each stage-1 export. Then the §9 signatures of the four runs (``dynlab.evaluation.signatures``),
one HTML report (``dynlab report``) and the wall time split into training, probe evaluation, export and report.

    dynlab reproduce [--data FILE] [--out runs/reproduce] [--sizes DIR] [--config OVERLAY ...] [-- EXTRA FIT ARGS]
    dynlab reproduce --stages sft,dpo   (only SFT -> DPO: a stage runs with the stage it starts from)
    dynlab reproduce --stages sft,extend,dpo,dpo_extend,dpo_onpolicy   (and on-policy DPO from SFT: §15)
    dynlab reproduce --stages sft,dpo,dpo_onpolicy,dpo_online,dpo_sppo   (the loss family: make compare-onpolicy)
    dynlab reproduce --config configs/lora.yaml --lr-scale 10   (LoRA, every stage's learning rate x 10)
    dynlab reproduce --scale paper      (configs/paper/: Pythia-410M on 5,000 HH pairs, on a GPU with the hub)

Each stage runs in a fixed run directory under ``--out``: rerunning the same command reuses finished stages and
resumes an interrupted one from its newest checkpoint. ``OUT/recipe.json`` keeps each stage's arguments and a
fingerprint of its config files and data: a stage whose recipe changed since it ran is refused (rerun with
``--fresh``), and a stage that is run again makes the DPO stage started from it run again too, so one report never
mixes runs of two recipes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from dynlab.errors import InputError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh_probe" / "probe_test.jsonl"
RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class Stage:
    name: str  # the role the signatures know it by
    base: str  # the shipped config it stacks on (configs/<base>.yaml)
    version: str  # its fixed run directory name, inside <out>/<the config's CSVLogger name>/
    parent: str | None = None  # the stage whose export it starts from
    overlay: str | None = None  # configs/reproduce/<overlay>.yaml stacked after the stage's own, at either scale


STAGES = (
    Stage("sft", "sft", "reproduce"),
    Stage("extend", "extend_sft", "reproduce"),
    Stage("dpo", "dpo", "from-sft", parent="sft"),
    Stage("dpo_extend", "dpo", "from-extend", parent="extend"),
    # §15: the same DPO from the SFT export with y- sampled from the policy (SPIN-style); only with --stages
    Stage("dpo_onpolicy", "dpo", "onpolicy-from-sft", parent="sft", overlay="onpolicy"),
    # the rest of the family from the same export (make compare-onpolicy): online DPO (both responses sampled from the
    # policy and ranked by a judge) and SPPO's square loss on the dataset's pairs; only with --stages
    Stage("dpo_online", "dpo", "online-from-sft", parent="sft", overlay="online"),
    Stage("dpo_sppo", "dpo", "sppo-from-sft", parent="sft", overlay="sppo"),
)
DEFAULT_STAGES = ("sft", "extend", "dpo", "dpo_extend")


def stage_configs(stage: Stage, configs: Path, scale: str, sizes: Path | None = None) -> list[Path]:
    """The configs one stage stacks: at ``cpu`` scale the shipped embedded-default config, the recipe's data and the
    recipe's stage overlay; at ``paper`` scale the paper's config of that stage (configs/paper/, for GPUs). Then,
    from a ``sizes`` directory, its ``data.yaml``, ``<base>.yaml`` and ``<stage name>.yaml`` where present (e.g.
    configs/reproduce/quick/). A stage with an ``overlay`` adds configs/reproduce/<overlay>.yaml after its own."""
    if scale == "paper":
        stacked = [configs / "paper" / f"{stage.base}.yaml"]
    else:
        stacked = [configs / f"{stage.base}.yaml", configs / "reproduce" / "data.yaml",
                   configs / "reproduce" / f"{stage.base}.yaml"]
    if stage.overlay is not None:
        stacked.append(configs / "reproduce" / f"{stage.overlay}.yaml")
    if sizes is not None:
        own = (sizes / f"{stage.name}.yaml",) if stage.name != stage.base else ()
        stacked += [p for p in (sizes / "data.yaml", sizes / f"{stage.base}.yaml", *own) if p.is_file()]
    return stacked


def logger_name(configs: Sequence[str | os.PathLike]) -> str:
    """The CSVLogger ``name`` the stacked configs end with (the run lands in ``<root>/<name>/<version>``)."""
    name = ""
    for config in configs:
        loggers = ((_read_yaml(Path(config)) or {}).get("trainer") or {}).get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers] if loggers else []:
            if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("CSVLogger"):
                name = (logger.get("init_args") or {}).get("name") or ""
    return name


def _read_yaml(path: Path) -> dict | None:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise InputError(f"cannot read this config: {str(err).splitlines()[0]}", file=str(path)) from None


def stage_command(stage: Stage, configs: Path, scale: str, data: str | None, out: Path, overlays: Sequence[str],
                  extra: Sequence[str], sizes: Path | None = None, lr_scale: float | None = None) -> list[str]:
    """The ``dynlab fit`` arguments of one stage (without the interpreter and without ``--ckpt_path``);
    ``lr_scale`` multiplies the learning rate its configs end with (extra arguments still override it)."""
    stacked = [*map(str, stage_configs(stage, configs, scale, sizes)), *overlays]
    args = ["fit"]
    for config in stacked:
        args += ["--config", config]
    if lr_scale is not None:
        lr = stacked_lr(stacked)
        if lr is None:
            raise InputError(f"stage {stage.name}: its configs set no model.init_args.optimizer.init_args.lr to "
                             "scale", field="--lr-scale")
        args.append(f"--model.init_args.optimizer.init_args.lr={lr * lr_scale:.6g}")
    if data is not None:
        args.append(f"--data.init_args.source={data}")
    args.append(f"--trainer.default_root_dir={out}")
    if stage.parent is not None:
        parent = next(s for s in STAGES if s.name == stage.parent)
        parent_stacked = [*map(str, stage_configs(parent, configs, scale, sizes)), *overlays]
        args.append(f"--model.init_args.init_from={out / run_of(parent, parent_stacked) / 'export'}")
    return [*args, *extra]


def run_of(stage: Stage, stacked: Sequence[str | os.PathLike]) -> Path:
    """A stage's run directory relative to ``--out``."""
    return Path(logger_name(stacked) or stage.base, stage.version)


def stage_runs(out: str | os.PathLike) -> dict[str, Path]:
    """The run directory of every stage of the recipe in ``out`` (from its ``recipe.json``), in stage order."""
    path = Path(out) / RECIPE_FILE
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
        runs = {s.name: Path(out) / recipe[s.name]["run"] for s in STAGES if s.name in recipe}
        if not runs:
            raise KeyError("no stage")
        return runs
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"not a dynlab reproduce directory ({type(err).__name__})", file=str(path)) from None


def select_stages(names: str | None) -> tuple[Stage, ...]:
    """The stages ``--stages`` names (comma-separated, any order), in recipe order; every stage needs the stage it
    starts from. None: the four of DEFAULT_STAGES."""
    if names is None:
        return tuple(s for s in STAGES if s.name in DEFAULT_STAGES)
    known = {s.name: s for s in STAGES}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise InputError(f"unknown stage {unknown[0] if unknown else names!r}: expected some of "
                         f"{', '.join(known)}", field="--stages")
    for name in wanted:
        if (parent := known[name].parent) is not None and parent not in wanted:
            raise InputError(f"stage {name} starts from stage {parent}'s export: add {parent}", field="--stages")
    return tuple(s for s in STAGES if s.name in wanted)


LR_KEYS = ("model", "init_args", "optimizer", "init_args", "lr")


def stacked_lr(configs: Sequence[str | os.PathLike]) -> float | None:
    """The optimizer learning rate the stacked configs end with (``model.init_args.optimizer.init_args.lr``)."""
    lr = None
    for config in configs:
        value: object = _read_yaml(Path(config)) or {}
        for key in LR_KEYS:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            lr = float(value)
    return lr


def fingerprint(files: Sequence[str | os.PathLike]) -> str:
    """What a stage's results depend on besides its arguments: the values in its config files and, for a data
    file, its size and modification time (hashing a large file on every rerun would cost more than it saves)."""
    digest = hashlib.sha1()
    for file in files:
        path = Path(file)
        if path.suffix in (".yaml", ".yml"):  # the values, not the comments
            digest.update(json.dumps(_read_yaml(path), sort_keys=True, default=str).encode())
        elif path.is_file():
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(str(file).encode())
    return digest.hexdigest()[:16]


def finished(run_dir: Path) -> bool:
    """A stage is done once its export is whole (the export is written to a temporary directory and renamed)."""
    return (run_dir / "export" / "config.json").is_file()


def has_checkpoint(run_dir: Path) -> bool:
    """What ``--ckpt_path=last`` resumes from: a step checkpoint, or a Slurm pre-emption checkpoint."""
    return any((run_dir / "checkpoints").glob("*.ckpt")) or any(run_dir.glob("hpc_ckpt_*.ckpt"))


def drop_checkpoints(run_dir: Path) -> int:
    """Remove a finished stage's training checkpoints (weights and optimizer state, about three times its export):
    later stages start from the export, and a finished stage is reused, never resumed. Returns the bytes freed."""
    freed = 0
    for ckpt in [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]:
        freed += ckpt.stat().st_size
        ckpt.unlink()
    return freed


def refuse_if_live(run_dir: Path) -> None:
    from dynlab.tracking.loggers import live_holder

    if run_dir.exists() and (holder := live_holder(run_dir)) is not None:
        raise InputError(f"run directory {run_dir} is in use by a live run (pid {holder.get('pid')} on "
                         f"{holder.get('host')}): wait for it, or stop it first", field="--out")


def run_child(command: list[str], env: dict[str, str]) -> int:
    """Run one stage and wait for it. SIGINT and SIGTERM are passed on to the stage, which stops within seconds
    with every file whole; its exit code is returned (negative: killed by that signal)."""
    proc = subprocess.Popen(command, env=env)
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if forwarded:  # stopped by the user: the stage can be resumed from what it checkpointed
        return 128 + forwarded[0]
    return code


def run_stage(stage: Stage, args: list[str], run_dir: Path, env: dict[str, str]) -> tuple[str, float]:
    """Run (or resume, or reuse) one stage; returns what was done and its wall time in seconds."""
    if finished(run_dir):
        return "reused", 0.0
    refuse_if_live(run_dir)
    resume = has_checkpoint(run_dir)
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # started but never checkpointed: its rows would be mixed with the new run's
    command = [sys.executable, "-m", "dynlab.cli", *args, *(["--ckpt_path=last"] if resume else [])]
    print(f"dynlab reproduce: {'resuming' if resume else 'running'} {stage.name} in {run_dir}", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    code = run_child(command, {**env, "DYNLAB_RUN_VERSION": run_dir.name})
    wall = time.perf_counter() - start
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM):
        print(f"dynlab reproduce: stage {stage.name} stopped; rerun the same command to resume it", file=sys.stderr)
        sys.exit(code if code > 0 else 128 - code)
    if code != 0 or not finished(run_dir):
        raise SystemExit(f"dynlab reproduce: stage {stage.name} failed (exit {code}; rerun the same command to "
                         f"resume it): {' '.join(command)}")
    return ("resumed" if resume else "ran"), wall


def check_recipe(out: Path, recipe: dict[str, dict], fresh: bool) -> None:
    """Refuse to mix runs of two recipes: each stage's arguments and fingerprint are kept in ``OUT/recipe.json``; a
    stage whose recipe changed is refused while its run exists. Runs with no ``recipe.json`` beside them are refused
    too (nothing says which recipe made them). Stages not in ``recipe`` (``--stages``) keep their entries; ``fresh``
    deletes the runs of the stages in ``recipe`` and of the DPO stages started from them."""
    path = out / RECIPE_FILE
    before: dict = {}
    if path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            if not fresh:
                raise InputError("unreadable: rerun with --fresh, or choose another --out", file=str(path)) from None
    if fresh:
        doomed = set(recipe) | {s.name for s in STAGES if s.parent in recipe}
        runs = [out / r["run"] for name, r in {**before, **recipe}.items() if name in doomed and "run" in r]
        for run in runs:
            refuse_if_live(run)
        for run in runs:
            shutil.rmtree(run, ignore_errors=True)
        before = {name: r for name, r in before.items() if name not in doomed}
        for name in ("timing.json", "report.html"):
            (out / name).unlink(missing_ok=True)
    elif path.is_file():
        changed = [name for name, r in recipe.items() if (out / r["run"]).exists() and before.get(name) != r]
        if changed:
            raise InputError(f"the recipe of stage(s) {', '.join(changed)} (arguments, config files or data) differs "
                             f"from the runs already in {out}: rerun with --fresh, or choose another --out",
                             file=str(path))
    elif existing := [str(out / r["run"]) for r in recipe.values() if (out / r["run"]).exists()]:
        raise InputError(f"{existing[0]} exists but {out} has no {RECIPE_FILE} saying which recipe made it: rerun "
                         "with --fresh, or choose another --out", file=str(path))
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    kept = {s.name: before[s.name] for s in STAGES if s.name in before and s.name not in recipe}
    tmp.write_text(json.dumps({**kept, **recipe}, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def timing_split(runs: dict[str, Path], walls: dict[str, float], report_s: float) -> dict:
    """Wall time per stage and summed over stages, split into training, probe evaluation and export (each run's
    ``timing.json``: the last process of a resumed stage), plus the report. A reused stage counts the time it took
    when it ran; ``setup_s`` is the rest of a stage's wall time (start-up, model load, tokenization)."""
    stages = {}
    for name, run in runs.items():
        path = run / "timing.json"
        timing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        wall = walls.get(name) or timing.get("total_s", 0.0)
        stages[name] = {**timing, "setup_s": round(max(wall - timing.get("total_s", wall), 0.0), 3), "wall_s": wall}
    total = {key: round(sum(s.get(key, 0.0) for s in stages.values()), 1)
             for key in ("train_s", "probe_eval_s", "export_s", "setup_s", "wall_s")}
    total["report_s"] = round(report_s, 1)
    total["wall_s"] = round(total["wall_s"] + report_s, 1)
    # what the figures depend on: the CPUs, the threads each stage used (1 is faster on a busy machine) and the load
    machine = {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "DYNLAB_THREADS": os.environ.get("DYNLAB_THREADS"),
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    return {"stages": stages, "total": total, "machine": machine}


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


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
                        "<stage>.yaml (sft, extend_sft, dpo) where present; configs/reproduce/quick is the test tier's")
    parser.add_argument("--config", action="append", default=[], dest="overlays",
                        help="a config stacked on every stage (repeatable)")
    parser.add_argument("--configs", default=str(REPO / "configs"), help="the directory of the shipped configs")
    parser.add_argument("--stages", help="run only these stages (comma-separated: sft, extend, dpo, dpo_extend, and "
                        "dpo_onpolicy: SPIN-style DPO from the SFT export, for §15; dpo_online: online DPO, both "
                        "responses sampled and ranked by a judge; dpo_sppo: SPPO's loss); a DPO stage needs the stage "
                        "it starts from (default: the first four)")
    parser.add_argument("--lr-scale", type=float, help="multiply every stage's learning rate by this (LoRA usually "
                        "wants about 10x full finetuning's: --config configs/lora.yaml --lr-scale 10)")
    parser.add_argument("--record", help="also write the timing split and the signature results to this JSON file "
                        "(make reproduce: benchmarks/results/reproduce.json)")
    parser.add_argument("--fresh", action="store_true", help="delete this recipe's runs in --out and start over")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep a finished stage's training checkpoints "
                        "(by default they are removed once its export is whole: the export is what later stages and "
                        "the report use, and the checkpoints are about three times its size)")
    args = parser.parse_args(argv)

    from dynlab.data.formats import _looks_local

    out, configs = Path(args.out).expanduser().resolve(), Path(args.configs).expanduser()
    data = args.data if args.data is not None or args.scale == "paper" else str(DEFAULT_DATA)
    if data is not None and (Path(data).expanduser().exists() or _looks_local(data)):
        if not Path(data).expanduser().exists():
            raise InputError("no such file (pass --data FILE, or DATA=FILE to make reproduce)", file=data)
        data = str(Path(data).expanduser().resolve())  # else a hub dataset id, for the stages to load
    stages = select_stages(args.stages)
    if args.lr_scale is not None and not 0 < args.lr_scale < float("inf"):
        raise InputError(f"must be > 0, got {args.lr_scale}", field="--lr-scale")
    sizes = None if args.sizes is None else Path(args.sizes).expanduser().resolve()
    if sizes is not None and not sizes.is_dir():
        raise InputError("no such directory", file=args.sizes, field="--sizes")
    for stage in stages:
        for config in stage_configs(stage, configs, args.scale, sizes):
            if not config.is_file():
                raise InputError("missing config (pass --configs DIR, the repository's configs/)", file=str(config))
    overlays = [str(Path(o).expanduser().resolve()) for o in args.overlays]
    for overlay in overlays:
        if not Path(overlay).is_file():
            raise InputError("no such config", file=overlay)

    recipe = {}
    for stage in stages:
        stacked = [*map(str, stage_configs(stage, configs, args.scale, sizes)), *overlays]
        command = stage_command(stage, configs, args.scale, data, out, overlays, extra, sizes, args.lr_scale)
        recipe[stage.name] = {"run": str(run_of(stage, stacked)), "args": command,
                              "fingerprint": fingerprint([*stacked, *([data] if data else [])])}
    check_recipe(out, recipe, args.fresh)
    runs = {name: out / r["run"] for name, r in recipe.items()}

    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")  # four runs in one recipe: W&B only when asked for
    walls, ran = {}, set()
    for stage in stages:
        if stage.parent in ran and runs[stage.name].exists():  # trained from an earlier export of its parent
            refuse_if_live(runs[stage.name])
            shutil.rmtree(runs[stage.name])
        what, walls[stage.name] = run_stage(stage, recipe[stage.name]["args"], runs[stage.name], env)
        if what == "reused":
            print(f"dynlab reproduce: {stage.name} already finished in {runs[stage.name]}", file=sys.stderr)
        else:
            ran.add(stage.name)
        if not args.keep_checkpoints and (freed := drop_checkpoints(runs[stage.name])):
            print(f"dynlab reproduce: removed {stage.name}'s checkpoints ({freed / 2**20:.0f} MiB; its export "
                  "stays; --keep-checkpoints keeps them)", file=sys.stderr)

    from dynlab.evaluation.html_report import main as report_main
    from dynlab.evaluation.signatures import check_signatures, signature_table

    run_dirs = list(runs.values())
    signatures = {split: check_signatures(run_dirs, split) for split in ("train", "test")}
    timing = timing_split(runs, walls, 0.0)
    write_json(out / "timing.json", timing)  # before the report, so that a failing report loses no timing
    start = time.perf_counter()
    report_main([*map(str, run_dirs), "--out", str(out / "report.html")])
    timing = timing_split(runs, walls, time.perf_counter() - start)
    write_json(out / "timing.json", timing)
    if args.record:
        results = {split: [{"id": s.id, "runs": list(s.runs), "passed": s.passed, "numbers": s.numbers}
                           for s in sigs] for split, sigs in signatures.items()}
        write_json(Path(args.record), {"recipe": {k: r["args"] for k, r in recipe.items()}, **timing,
                                       "signatures": results})

    for split, sigs in signatures.items():
        print(f"\nsignatures (PAPER_NOTES §9) on probe_{split}:\n{signature_table(sigs)}")
    t = timing["total"]
    print(f"\nwall time {t['wall_s']:.0f} s: training {t['train_s']:.0f} s, "
          f"probe evaluation {t['probe_eval_s']:.0f} s, export {t['export_s']:.0f} s, start-up {t['setup_s']:.0f} s, "
          f"report {t['report_s']:.0f} s (per stage: {out / 'timing.json'})")
    print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        print(f"dynlab: error: {err}", file=sys.stderr)
        sys.exit(2)
