"""The generated sbatch script (default tier; the real cluster runs are in test_slurm.py)."""

from __future__ import annotations

import pytest

from dynlab.errors import InputError
from dynlab.slurm import sbatch_script


def test_gpu_script_sets_resources_requeue_and_the_srun_command():
    script = sbatch_script(["fit", "--config", "configs/dpo.yaml"], nodes=2, gpus_per_node=4, time="04:00:00",
                           partition="gpu", python="python")
    lines = script.splitlines()
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=04:00:00", "--partition=gpu",
                 "--requeue"):
        assert f"#SBATCH {flag}" in lines
    assert any(x.startswith("#SBATCH --signal=SIGUSR1@90") for x in lines)
    assert any(x.startswith("export MASTER_ADDR=") for x in lines) and any("MASTER_PORT" in x for x in lines)
    srun = lines[-1]
    assert srun.startswith("srun python -m dynlab.cli fit --config configs/dpo.yaml")
    for arg in ("--trainer.num_nodes=2", "--trainer.devices=4", "--ckpt_path=last", "--trainer.strategy=ddp"):
        assert arg in srun
    assert "--trainer.accelerator=cpu" not in srun


def test_cpu_script_and_user_strategy_kept():
    script = sbatch_script(["fit", "--config", "c.yaml", "--trainer.strategy=fsdp"], nodes=2, gpus_per_node=0,
                           tasks_per_node=2, python="python")
    srun = script.splitlines()[-1]
    assert "--trainer.accelerator=cpu" in srun and "--trainer.devices=2" in srun
    assert srun.count("--trainer.strategy") == 1 and "#SBATCH --gpus-per-node" not in script


def test_only_fit_or_sweep():
    with pytest.raises(InputError):
        sbatch_script(["validate"], nodes=1, gpus_per_node=1)
