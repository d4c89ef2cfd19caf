"""Resuming a run: probe baselines come back from the checkpoint, and re-evaluated steps replace their trajectory
file instead of adding duplicate rows (the paper's result files interleaved restarted runs)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from dynlab.cli import main
from dynlab.tracking.trajectory import KEY_COLUMNS, read_trajectory
from tests.conftest import CONFIGS, run_dynlab

CSV_VERSION_0 = ('--trainer.logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger", '
                 '"init_args": {"save_dir": "runs", "name": "dpo", "version": 0}}]')  # resume into the same directory
CHECKPOINT_EVERY_3 = ('--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                      '"init_args": {"every_n_train_steps": 3, "save_top_k": -1}}]')


def test_resume_from_an_earlier_checkpoint_leaves_no_duplicates(in_tmp):
    args = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
            CSV_VERSION_0, CHECKPOINT_EVERY_3]
    main(args)
    run = Path("runs/dpo/version_0")
    first = read_trajectory(run)
    assert sorted(first["step"].unique()) == [0, 3, 6]
    # as if the job died after evaluating step 6 but its step-6 checkpoint were lost: resume from step 3
    ckpt = next((run / "checkpoints").glob("*step=3.ckpt"))
    main([*args, f"--ckpt_path={ckpt}"])
    again = read_trajectory(run)
    assert sorted(again["step"].unique()) == [0, 3, 6]
    assert not again.duplicated(list(KEY_COLUMNS)).any()
    assert len(again) == len(first)
    # the resumed run recomputes step 6 from the step-3 weights with the step-0 baseline restored: same numbers
    cols = ["logp", "dlogp", "argmax_logp"]
    pd.testing.assert_frame_equal(first[list(KEY_COLUMNS) + cols], again[list(KEY_COLUMNS) + cols],
                                  rtol=1e-4, atol=1e-3)


def test_resume_in_place_with_ckpt_path_last_keeps_the_metrics_history(in_tmp, monkeypatch):
    # what a requeued Slurm job does: a fixed run directory and --ckpt_path=last
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "slurm-7")
    args = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"), CHECKPOINT_EVERY_3,
            "--ckpt_path=last"]
    main([*args, "--trainer.max_steps=3"])  # "killed" after step 3
    main([*args, "--trainer.max_steps=6"])  # requeued: resumes from last.ckpt in the same directory
    run = Path("runs/dpo/slurm-7")
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    probe_steps = [int(r["step"]) for r in rows if r.get("probe/train/logp/chosen")]
    loss_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert probe_steps == [0, 3, 6]  # nothing from before the resume was lost, nothing doubled
    assert sorted(loss_steps) == [0, 1, 2, 3, 4, 5]
    assert sorted(read_trajectory(run)["step"].unique()) == [0, 3, 6]


def test_a_job_killed_between_checkpoint_and_logging_loses_no_row(in_tmp, monkeypatch):
    # ModelCheckpoint writes from on_train_batch_end, before Lightning logs that step: a requeue landing in between
    # leaves a checkpoint one row ahead of metrics.csv. The checkpoint carries the row and the resumed run writes it.
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "slurm-8")
    args = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"), CHECKPOINT_EVERY_3,
            "--ckpt_path=last"]
    main([*args, "--trainer.max_steps=3"])
    path = Path("runs/dpo/slurm-8/metrics.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    lost = next(r for r in rows if r["step"] == "2" and r.get("train/loss"))
    with open(path, "w", newline="") as f:  # the kill: step 2 trained and checkpointed, never logged
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r for r in rows if r is not lost)
    main([*args, "--trainer.max_steps=6"])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [0, 1, 2, 3, 4, 5]
    assert losses[2] == float(lost["train/loss"])
    assert [int(r["step"]) for r in rows if r.get("probe/train/logp/chosen")] == [0, 3, 6]


# Exact resume at every checkpoint. The tiny overlay trains 4 steps per epoch (16 pairs, batch 4): a checkpoint at
# step 6 falls mid-epoch, one at step 8 on an epoch boundary (written at that epoch's last batch, where Lightning's
# saved epoch counter still names the finished epoch).
TINY = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
EXACT = [*TINY, "--trainer.max_steps=10", "--model.init_args.probe_every_n_steps=2"]
RESUME_CASES = pytest.mark.parametrize("every", [6, 8], ids=["mid-epoch", "epoch-boundary"])


def checkpoint_every(n: int) -> str:
    return ('--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            f'"init_args": {{"every_n_train_steps": {n}, "save_top_k": 0, "save_last": true}}}}]')


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "export" / "model.safetensors")


def step_rows(run: Path) -> dict[int, tuple[str, str]]:
    """``{step: (train/loss, epoch)}`` as written, every step exactly once."""
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len({r["step"] for r in rows}) == len(rows)
    return {int(r["step"]): (r["train/loss"], r["epoch"]) for r in rows}


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    a, b = final_weights(resumed), final_weights(uninterrupted)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, {differ[0]} by {(a[differ[0]] - b[differ[0]]).abs().max()}"
    assert step_rows(resumed) == step_rows(uninterrupted)  # the same batches in the same epochs, bit for bit


@pytest.fixture(scope="module")
def uninterrupted(module_tmp) -> Path:
    """A 10-step run that never stopped (the same checkpoint cadence does not change its numbers)."""
    cwd = module_tmp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("DYNLAB_RUN_VERSION", "whole")
        main([*EXACT, checkpoint_every(4)])
    return cwd / "runs" / "dpo" / "whole"


@pytest.mark.parametrize(("every", "workers"), [(6, 0), (8, 0), (6, 1)],
                         ids=["mid-epoch", "epoch-boundary", "mid-epoch-with-a-worker"])
def test_a_run_stopped_at_a_checkpoint_resumes_bitwise(in_tmp, monkeypatch, uninterrupted, every, workers):
    # stopped by max_steps right after its checkpoint: the same checkpoint a kill leaves (test below). A DataLoader
    # worker draws the first indices when the loader is made, before Lightning sets the resumed epoch.
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "stopped")
    args = [*EXACT, checkpoint_every(every), f"--data.init_args.num_workers={workers}"]
    main([*args, f"--trainer.max_steps={every}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*args, "--ckpt_path=last"])
    assert_same_run(in_tmp / "runs" / "dpo" / "stopped", uninterrupted)
    assert not [w for w in caught if "dataloader is not resumable" in str(w.message)]  # it is, and Lightning knows


def test_a_lora_run_stopped_at_a_checkpoint_resumes_bitwise(in_tmp, monkeypatch):
    """A LoRA DPO run (configs/lora.yaml) stopped mid-epoch and resumed ends with the uninterrupted run's adapter,
    merged export and rows, bit for bit."""
    lora = [*EXACT, "--config", str(CONFIGS / "lora.yaml"), checkpoint_every(6)]
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "whole")
    main(lora)
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "stopped")
    main([*lora, "--trainer.max_steps=6"])
    main([*lora, "--ckpt_path=last"])
    stopped, whole = in_tmp / "runs" / "dpo" / "stopped", in_tmp / "runs" / "dpo" / "whole"
    assert_same_run(stopped, whole)
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (stopped, whole))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@RESUME_CASES
def test_a_run_killed_after_a_checkpoint_resumes_bitwise(in_tmp, uninterrupted, every):
    run = in_tmp / "runs" / "dpo" / "killed"
    env = {**os.environ, "DYNLAB_RUN_VERSION": "killed"}
    proc = subprocess.Popen([sys.executable, "-m", "dynlab.cli", *EXACT, checkpoint_every(every)], cwd=in_tmp,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the probe evaluation of a step comes after that step's checkpoint (callbacks run first); the next
        # checkpoint would be at 2 * every > 10
        deadline = time.monotonic() + 300
        while not (run / "probes" / "trajectory" / f"step_{every:08d}.parquet").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed before it finished
    assert not (run / "export").exists()
    done = run_dynlab(*EXACT, checkpoint_every(every), "--ckpt_path=last", cwd=in_tmp, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, uninterrupted)
