"""The generated sbatch script (default tier; the real cluster runs are in test_slurm.py)."""

from __future__ import annotations

import shlex
import subprocess

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


def header_intact(script: str) -> bool:
    """Every #SBATCH line comes before the first command (sbatch stops reading them there)."""
    lines = script.splitlines()[1:]
    first_command = next(i for i, x in enumerate(lines) if x.strip() and not x.startswith("#"))
    return not any(x.startswith("#SBATCH") for x in lines[first_command:])


HOSTILE = {
    "job_name": ["x\necho pwned", "a b", "x;rm -rf ~", "$(id)", "../x"],
    "time": ["04:00:00\n#SBATCH --x", "4h", "1:00 && id"],
    "partition": ["gpu\nid", "gpu part", "gpu;id"],
    "account": ["acc\nid", "a`id`"],
    "mem": ["16G\nid", "lots", "16G;id"],
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in HOSTILE.items() for v in vs])
def test_hostile_sbatch_values_are_refused_in_one_line(field, value):
    kwargs = {"job_name": "dynlab", field: value}
    with pytest.raises(InputError) as err:
        sbatch_script(["fit", "--config", "c.yaml"], nodes=1, gpus_per_node=1, **kwargs)
    assert "\n" not in str(err.value) and f"--{field.replace('_', '-')}" in str(err.value)


@pytest.mark.parametrize("value", ["x\ny", "echo 'unbalanced"])
def test_a_setup_line_is_one_balanced_shell_line(value):
    with pytest.raises(InputError, match="--setup"):
        sbatch_script(["fit"], nodes=1, gpus_per_node=1, setup=[value])


def test_valid_slurm_values_pass(tmp_path):
    script = sbatch_script(["fit"], nodes=1, gpus_per_node=1, job_name="dpo-beta0.1_run+2", time="1-12:30:00",
                           partition="gpu,gpu-long", account="proj.ab_1", mem="64G", python="python")
    for line in ("--job-name=dpo-beta0.1_run+2", "--time=1-12:30:00", "--partition=gpu,gpu-long",
                 "--account=proj.ab_1", "--mem=64G"):
        assert f"#SBATCH {line}" in script.splitlines()


HOSTILE_ARGS = ["--model.init_args.beta=0.1; rm -rf ~", "--data.init_args.source=$(id)", "x\ny", "`id`", "a'b\"c"]


def test_hostile_fit_arguments_workdir_and_python_are_quoted(tmp_path):
    script = sbatch_script(["fit", *HOSTILE_ARGS, "--trainer.default_root_dir=$HOME/x y"], nodes=1,
                           gpus_per_node=1, workdir="/tmp/a b;id\nc", python="/opt/py thon/bin/python",
                           setup=["module load cuda  # a comment"])
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert header_intact(script)
    # the shell gives the arguments back unchanged, with nothing expanded or executed
    srun = script[script.index("\nsrun ") + 1:]
    words = shlex.split(srun)
    assert words[:2] == ["srun", "/opt/py thon/bin/python"]
    assert [*HOSTILE_ARGS, "--trainer.default_root_dir=$HOME/x y"] == words[5:5 + len(HOSTILE_ARGS) + 1]
    echo = subprocess.run(["bash", "-c", "printf '%s\\n' " + srun.removeprefix("srun ")], capture_output=True,
                          text=True)
    assert echo.stdout.splitlines()[5] == "--data.init_args.source=$(id)" and "uid=" not in echo.stdout


def test_the_run_directory_follows_default_root_dir_and_the_job():
    fit = sbatch_script(["fit", "--trainer.default_root_dir=/scratch/me"], nodes=1, gpus_per_node=1)
    assert "runs/slurm-" not in fit and "--trainer.default_root_dir=/scratch/me" in fit.splitlines()[-1]
    assert 'export DYNLAB_RUN_VERSION="${DYNLAB_RUN_VERSION:-slurm-$SLURM_JOB_ID}"' in fit
    # a sweep agent's trials are separate runs: each gets its own version_N, not the job's one directory
    agent = sbatch_script(["sweep", "s.yaml", "--count", "2"], nodes=1, gpus_per_node=1)
    assert "DYNLAB_RUN_VERSION" not in agent


def test_dynlab_slurm_refuses_a_hostile_job_name_in_one_line_and_writes_no_script(in_tmp, capsys):
    from dynlab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--job-name", "x\necho pwned", "--", "fit"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynlab: error: field '--job-name'")
    assert not (in_tmp / "dynlab.sbatch").exists()
