"""Slow tier, against a real Slurm cluster (munged + slurmctld + two slurmd nodes on loopback, started here and
stopped by PID): the generated sbatch script runs a 2-node DDP job with the numbers of one process, and a job
requeued mid-run resumes from its checkpoint and finishes with the same final step count."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pandas as pd
import pytest

from dynlab.cli import main
from dynlab.tracking.trajectory import KEY_COLUMNS, read_trajectory
from tests.conftest import CONFIGS, run_dir_of, run_dynlab
from tests.slurm_cluster import SlurmCluster, available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]

TINY = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    # node names n1/n2 do not resolve here: rendezvous on loopback, or it waits forever
    c.env.update(MASTER_ADDR="127.0.0.1", WANDB_MODE="disabled")
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def jobs(cluster):
    """Job ids submitted by a test; every one is cancelled at the end, whatever happened."""
    ids: list[str] = []
    yield ids
    for job in ids:
        cluster.run("scancel", job, check=False)


def submit(cluster: SlurmCluster, workdir: Path, jobs: list[str], *fit_args: str) -> str:
    script = workdir / "job.sbatch"
    main(["slurm", "--nodes", "2", "--gpus-per-node", "0", "--workdir", str(workdir), "--out", str(script), "--",
          *fit_args])
    job = cluster.run("sbatch", "--parsable", f"--chdir={workdir}", str(script)).stdout.strip()
    jobs.append(job)
    return job


def metrics(run: Path) -> pd.DataFrame:
    with open(run / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    return pd.DataFrame(rows).groupby("step").first()


def job_log(workdir: Path, job: str) -> str:
    return next(workdir.glob(f"slurm-*-{job}.out")).read_text()


def test_two_node_job_matches_one_process(cluster, jobs, tmp_path):
    start = time.perf_counter()
    job = submit(cluster, tmp_path, jobs, *TINY, "--data.init_args.batch_size=2")  # 2 nodes x 2 = 4 per step
    state = cluster.wait_job(job, timeout=600)
    wall = time.perf_counter() - start
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", log[-3000:] + cluster.logs()
    print(f"2-node Slurm job: {wall:.1f} s from sbatch to COMPLETED")
    run = tmp_path / "runs" / "dpo" / f"slurm-{job}"
    (tmp_path / "one").mkdir()
    one = run_dynlab(*TINY, cwd=tmp_path / "one", env={"WANDB_MODE": "disabled"})  # batch 4 in one process
    assert one.returncode == 0, one.stderr[-2000:]
    single = run_dir_of(one, tmp_path / "one")
    m1, m2 = metrics(single), metrics(run)
    keys = [k for k in m1.columns if k.startswith(("probe/", "train/"))]
    pd.testing.assert_frame_equal(m1[keys], m2[keys], rtol=1e-4, atol=1e-4)
    t1, t2 = read_trajectory(single), read_trajectory(run)
    assert len(t1) == len(t2) and not t2.duplicated(list(KEY_COLUMNS)).any()


def test_requeued_job_resumes_from_its_checkpoint(cluster, jobs, tmp_path):
    every_2 = ('--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
               '"init_args": {"save_last": true, "save_top_k": 0, "every_n_train_steps": 2}}]')
    job = submit(cluster, tmp_path, jobs, *TINY, "--data.init_args.batch_size=2", "--trainer.max_steps=40",
                 "--model.init_args.probe_every_n_steps=10", every_2)
    run = tmp_path / "runs" / "dpo" / f"slurm-{job}"
    deadline = time.monotonic() + 300
    while not (run / "probes" / "trajectory" / "step_00000010.parquet").exists():  # mid-run: past step 10
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            cluster.job_state(job) + cluster.logs()
        time.sleep(0.5)
    assert not (run / "probes" / "trajectory" / "step_00000040.parquet").exists()
    cluster.run("scontrol", "requeue", job)
    state = cluster.wait_job(job, timeout=600)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", log[-3000:] + cluster.logs()
    assert "(restart 1)" in log and "Restored all states from the checkpoint" in log
    m = metrics(run)
    assert int(m.index.max()) >= 39 and m["train/loss"].notna().sum() == 40  # every step exactly once
    probes = m.dropna(subset=["probe/train/logp/chosen"]).index.astype(int).tolist()
    assert probes == [0, 10, 20, 30, 40]
    traj = read_trajectory(run)
    assert sorted(traj["step"].unique()) == [0, 10, 20, 30, 40] and not traj.duplicated(list(KEY_COLUMNS)).any()
