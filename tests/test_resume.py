"""Resuming a run: probe baselines come back from the checkpoint, and re-evaluated steps replace their trajectory
file instead of adding duplicate rows (the paper's result files interleaved restarted runs)."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from dynlab.cli import main
from dynlab.tracking.trajectory import KEY_COLUMNS, read_trajectory
from tests.conftest import CONFIGS

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
