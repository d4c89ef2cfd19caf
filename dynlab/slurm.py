"""Write (and optionally submit) an sbatch script that runs ``dynlab fit`` on N nodes x G devices with Lightning's
Slurm integration: ``srun`` starts one task per device, ``--signal=SIGUSR1@90`` lets Lightning checkpoint and requeue
before the time limit, and a requeued job resumes from its newest checkpoint in its own run directory.

    dynlab slurm --nodes 2 --gpus-per-node 4 --time 04:00:00 --partition gpu -- fit --config configs/dpo.yaml
    dynlab slurm --nodes 2 --gpus-per-node 4 --submit -- fit --config configs/dpo.yaml --model.init_args.beta=0.2

The script only sets resources and calls dynlab: no training logic lives in shell.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from dynlab.errors import InputError

# what Slurm accepts for each value that goes into an #SBATCH line (those cannot be shell-quoted, so they are checked)
SBATCH_VALUES = {
    "job-name": (r"[A-Za-z0-9][A-Za-z0-9_.+-]*", "letters, digits and _ . + -"),
    "time": (r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE", "MINUTES, HH:MM:SS, D-HH or D-HH:MM:SS"),
    "partition": (r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*", "partition names, comma-separated"),
    "account": (r"[A-Za-z0-9_.-]+", "letters, digits and _ . -"),
    "mem": (r"\d+[KMGTkmgt]?", "a size such as 16G or 4000M"),
}


def check_sbatch_value(flag: str, value: str) -> str:
    """``value`` for ``#SBATCH --flag=value``, or an InputError naming the flag and what Slurm accepts."""
    pattern, accepted = SBATCH_VALUES[flag]
    if not re.fullmatch(pattern, value):
        raise InputError(f"{value!r} is not a valid value: use {accepted}", field=f"--{flag}")
    return value


def check_shell_line(line: str, field: str) -> str:
    """One shell line (a --setup line): no newline or other control character, balanced quotes."""
    if not line.isprintable():
        raise InputError(f"{line!r}: one line without control characters", field=field)
    try:
        shlex.split(line, comments=True)
    except ValueError as err:
        raise InputError(f"{line!r}: {err}", field=field) from None
    return line


def sbatch_script(dynlab_args: Sequence[str], *, nodes: int, gpus_per_node: int, time: str | None = None,
                  partition: str | None = None, account: str | None = None, job_name: str = "dynlab",
                  cpus_per_task: int | None = None, mem: str | None = None, tasks_per_node: int | None = None,
                  workdir: str | Path | None = None, python: str = sys.executable,
                  setup: Sequence[str] = (), extra_sbatch: Sequence[str] = ()) -> str:
    """The sbatch script text. ``dynlab_args`` is a ``fit ...`` command line (devices per node are the GPUs per
    node, or ``tasks_per_node`` CPU processes when ``gpus_per_node`` is 0), or a ``sweep ...`` command line: a
    local sweep agent that runs its trials one after another inside the allocation."""
    if not dynlab_args or dynlab_args[0] not in ("fit", "sweep"):
        raise InputError("dynlab slurm runs `dynlab fit ...` or `dynlab sweep ...`: put `-- fit --config FILE ...` "
                         "after the options")
    if nodes < 1 or gpus_per_node < 0:
        raise InputError("need --nodes >= 1 and --gpus-per-node >= 0")
    for flag, number in (("tasks-per-node", tasks_per_node), ("cpus-per-task", cpus_per_task)):
        if number is not None and number < 1:
            raise InputError(f"{number} is not a valid value: need 1 or more", field=f"--{flag}")
    check_sbatch_value("job-name", job_name)
    for x in extra_sbatch:
        check_shell_line(x, "extra_sbatch")
    setup = [check_shell_line(x, "--setup") for x in setup]
    devices = gpus_per_node or tasks_per_node or 1
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={devices}"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    for flag, value in (("cpus-per-task", cpus_per_task), ("mem", mem), ("time", time), ("partition", partition),
                        ("account", account)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value if flag == 'cpus-per-task' else check_sbatch_value(flag, value)}")
    lines += [
        "#SBATCH --signal=SIGUSR1@90  # Lightning checkpoints and requeues the job 90 s before the time limit",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=slurm-%x-%j.out",
        *(f"#SBATCH {x}" for x in extra_sbatch),
        "set -euo pipefail",
    ]
    if workdir is not None:
        lines.append(f"cd {shlex.quote(str(workdir))}")
    lines += [
        *setup,
        "# rendezvous on the first node (set MASTER_ADDR yourself where node names do not resolve)",
        'export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"',
        'export MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"',
        'echo "dynlab: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
    ]
    if dynlab_args[0] == "sweep":  # the agent: one process; each trial is a `dynlab fit` on this allocation
        lines.append(" ".join(shlex.quote(a) for a in [python, "-m", "dynlab.cli", *dynlab_args]))
        return "\n".join(lines) + "\n"
    lines += [
        "# one run directory per job (<trainer.default_root_dir>/<stage>/slurm-JOBID), kept across requeues, and the",
        "# same W&B run",
        'export DYNLAB_RUN_VERSION="${DYNLAB_RUN_VERSION:-slurm-$SLURM_JOB_ID}"',
        'export WANDB_RUN_ID="${WANDB_RUN_ID:-dynlab-$SLURM_JOB_ID}" WANDB_RESUME=allow',
    ]
    fit = [python, "-m", "dynlab.cli", *dynlab_args, f"--trainer.num_nodes={nodes}", f"--trainer.devices={devices}",
           "--ckpt_path=last"]
    if not gpus_per_node:
        fit.append("--trainer.accelerator=cpu")
    if nodes * devices > 1 and not any(a.startswith("--trainer.strategy") for a in dynlab_args):
        fit.append("--trainer.strategy=ddp")
    lines.append("srun " + " ".join(shlex.quote(a) for a in fit))
    return "\n".join(lines) + "\n"


def submit(script: Path, env: dict | None = None) -> str:
    """``sbatch`` the script; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", str(script)], text=True, capture_output=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]
