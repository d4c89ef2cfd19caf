"""Sweep YAMLs: valid W&B sweeps whose swept keys the CLI accepts; a local grid sweep of the tiny overlay runs end to
end through W&B's own sweep engine, and an interrupted sweep resumes without redoing finished trials."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dynlab import sweep as sweep_module
from dynlab.cli import main
from dynlab.errors import InputError
from dynlab.sweep import check_metric_logged, run_sweep, trial_command
from sweeps import schema_violations_from_proposed_config
from tests.conftest import CONFIGS, REPO

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def test_there_is_a_sweep_per_stage():
    assert {p.stem for p in SWEEPS} >= {"sft_lr_epochs", "dpo_lr_epochs", "extend_sft_lr_epochs"}
    assert {yaml.safe_load(p.read_text())["method"] for p in SWEEPS} >= {"grid", "bayes"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_is_valid_and_every_swept_key_parses(path, capsys):
    sweep = yaml.safe_load(path.read_text())
    assert schema_violations_from_proposed_config(sweep) == []
    assert sweep["command"][:3] == ["${env}", "dynlab", "fit"] and sweep["command"][-1] == "${args}"
    assert sweep["metric"]["name"].startswith("probe/")
    config = sweep["command"][sweep["command"].index("--config") + 1]
    for key, spec in sweep["parameters"].items():
        for value in spec.get("values", [spec.get("min"), spec.get("max")]):
            with pytest.raises(SystemExit) as exit_:
                main(["fit", "--config", str(REPO / config), "--trainer.max_steps=-1", f"--{key}={value}",
                      "--print_config"])
            assert exit_.value.code in (0, None)
            printed = yaml.safe_load(capsys.readouterr().out)
            node = printed
            for part in key.split("."):
                node = node[part]
            assert node == value


def test_trial_command_puts_overlays_after_the_sweep_configs():
    sweep = yaml.safe_load((REPO / "sweeps" / "sft_lr_epochs.yaml").read_text())
    cmd = trial_command(sweep, {"trainer.max_epochs": 2}, overlays=["tiny.yaml"])
    i = cmd.index("configs/sft.yaml")
    assert cmd[i + 1 : i + 3] == ["--config", "tiny.yaml"] and cmd[-1] == "--trainer.max_epochs=2"


@pytest.mark.slow
def test_local_grid_sweep_runs_and_resumes(in_tmp, capsys):
    # a 2 x 2 grid on the tiny overlay; the overlay's own max_steps is lifted so max_epochs decides
    sweep = yaml.safe_load((REPO / "sweeps" / "sft_lr_epochs.yaml").read_text())
    sweep["parameters"]["model.init_args.optimizer.init_args.lr"]["values"] = [1e-3, 3e-3]
    sweep["command"][sweep["command"].index("configs/sft.yaml")] = str(CONFIGS / "sft.yaml")
    sweep["command"].insert(-1, "--trainer.max_steps=-1")  # after the overlay, which sets max_steps
    path = in_tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(sweep))
    main(["sweep", str(path), "--count", "2", "--config", str(CONFIGS / "tiny.yaml")])  # "interrupted" after 2
    summary = Path("runs/sweeps/grid/summary.csv")
    first = list(csv.DictReader(summary.open()))
    assert [r["state"] for r in first] == ["finished", "finished"]
    main(["sweep", str(path), "--count", "10", "--config", str(CONFIGS / "tiny.yaml")])  # resumes; grid has 4
    rows = list(csv.DictReader(summary.open()))
    assert len(rows) == 4 and rows[:2] == first  # the finished trials were not redone
    points = {(float(r["model.init_args.optimizer.init_args.lr"]), int(r["trainer.max_epochs"])) for r in rows}
    assert points == {(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)}
    assert all(r["metric"] not in ("", "nan") for r in rows)
    out = capsys.readouterr().out
    assert "best trial" in out and "summary: runs/sweeps/grid/summary.csv" in out
    # 1 epoch of 16 examples at batch 4 is 4 steps, 2 epochs are 8: max_epochs really decided the length
    steps = {int(r["trainer.max_epochs"]): max(int(float(x["step"])) for x in
             csv.DictReader(open(Path(r["run_dir"]) / "metrics.csv"))) for r in rows}
    assert steps[2] > steps[1]


def test_a_sweep_agent_runs_inside_a_slurm_allocation(in_tmp):
    main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--time", "01:00:00", "--out", "agent.sbatch", "--",
          "sweep", "sweeps/dpo_lr_epochs.yaml", "--count", "8"])
    script = Path("agent.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=1" in script and "#SBATCH --requeue" in script
    assert script.strip().splitlines()[-1].endswith("-m dynlab.cli sweep sweeps/dpo_lr_epochs.yaml --count 8")


@pytest.mark.parametrize("count", ["0", "-1"])
def test_a_sweep_needs_at_least_one_trial(in_tmp, capsys, count):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(REPO / "sweeps" / "sft_lr_epochs.yaml"), "--count", count])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--count" in err[0] and not Path("runs").exists()


def test_a_metric_no_run_logs_is_refused_naming_the_close_ones(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,probe/test/logp/chosen,probe/test/logp/rejected,step\n0,1,2,0\n")
    with pytest.raises(InputError) as err:
        check_metric_logged(tmp_path, "probe/test/logp/chosn", "s.yaml")
    message = str(err.value)
    assert message.startswith("s.yaml: field 'metric.name': ") and "'probe/test/logp/chosn'" in message
    assert "did you mean probe/test/logp/chosen" in message and "its 2 metrics" in message
    check_metric_logged(tmp_path, "probe/test/logp/chosen", "s.yaml")


@pytest.mark.slow
def test_a_sweep_runs_under_the_root_and_refuses_a_metric_no_run_logs(in_tmp, capsys):
    sweep = yaml.safe_load((REPO / "sweeps" / "sft_lr_epochs.yaml").read_text())
    sweep["parameters"] = {"model.init_args.optimizer.init_args.lr": {"values": [1e-3, 3e-3]},
                           "trainer.max_epochs": {"values": [1]}}
    sweep["command"][sweep["command"].index("configs/sft.yaml")] = str(CONFIGS / "sft.yaml")
    path = in_tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(sweep))
    tiny = ["--config", str(CONFIGS / "tiny.yaml")]
    main(["sweep", str(path), "--count", "1", *tiny, "--trainer.default_root_dir=elsewhere"])
    rows = list(csv.DictReader(open("elsewhere/sweeps/grid/summary.csv")))
    assert len(rows) == 1 and rows[0]["run_dir"].startswith("elsewhere/sft/version_")
    assert not Path("runs").exists()
    sweep["metric"]["name"] = sweep["metric"]["name"] + "_typo"
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(path), "--count", "2", *tiny, "--trainer.default_root_dir=elsewhere"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"logged no metric '{sweep['metric']['name']}'" in err[0]


class FakeTrials:
    """``subprocess.run`` for the sweep's trials: each "trial" writes a run directory whose metrics.csv logs
    ``probe/test/logp/chosen`` (= the trial's number) and records the environment it was given."""

    def __init__(self, monkeypatch):
        self.envs: list[dict] = []
        monkeypatch.setattr(sweep_module.subprocess, "run", self)

    def __call__(self, cmd, cwd=None, env=None, **kwargs):
        n = len(self.envs)
        self.envs.append(dict(env if env is not None else os.environ))
        run = Path(cwd or ".", "runs", "sft", f"version_{n}")
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text(f"epoch,probe/test/logp/chosen,step\n0,{-n},0\n")
        return subprocess.CompletedProcess(cmd, 0, stdout=f"dynlab: run directory: runs/sft/version_{n}  (...)\n",
                                           stderr="")


def write_sweep(path: Path, metric: str) -> Path:
    sweep = yaml.safe_load((REPO / "sweeps" / "sft_lr_epochs.yaml").read_text())
    sweep["metric"]["name"] = metric
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_trials_never_share_a_fixed_run_directory_from_the_environment(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "mine")
    trials = FakeTrials(monkeypatch)
    run_sweep(write_sweep(in_tmp / "s.yaml", "probe/test/logp/chosen"), 2)
    assert len(trials.envs) == 2 and not any("DYNLAB_RUN_VERSION" in env for env in trials.envs)
    assert "ignoring DYNLAB_RUN_VERSION" in capsys.readouterr().err


def test_a_trial_refused_for_its_metric_is_kept_and_scored_on_the_right_name_next_time(in_tmp, monkeypatch):
    trials = FakeTrials(monkeypatch)
    with pytest.raises(InputError, match="logged no metric 'probe/test/logp/chosn'"):
        run_sweep(write_sweep(in_tmp / "s.yaml", "probe/test/logp/chosn"), 2)
    summary = Path("runs/sweeps/s/summary.csv")
    (row,) = csv.DictReader(summary.open())  # the finished trial is in the summary, not orphaned
    assert (row["state"], row["run_dir"]) == ("finished", "runs/sft/version_0")
    rows = run_sweep(write_sweep(in_tmp / "s.yaml", "probe/test/logp/chosen"), 1)  # the name fixed
    assert len(trials.envs) == 1  # not run again: scored from its run
    assert [(r["metric"], r["metric_name"]) for r in rows] == [(0.0, "probe/test/logp/chosen")]
    assert next(csv.DictReader(summary.open()))["metric_name"] == "probe/test/logp/chosen"


def test_trials_scored_on_another_metric_are_scored_again_or_refused(in_tmp, monkeypatch):
    FakeTrials(monkeypatch)
    run_sweep(write_sweep(in_tmp / "s.yaml", "probe/test/logp/chosen"), 1)
    (Path("runs/sft/version_0/metrics.csv")).write_text("epoch,probe/test/logp/chosen,probe/other,step\n0,0,5,0\n")
    rows = run_sweep(write_sweep(in_tmp / "s.yaml", "probe/other"), 1)
    assert [(r["metric"], r["metric_name"]) for r in rows] == [(5.0, "probe/other")]  # not the old metric's 0
    shutil.rmtree("runs/sft/version_0")
    with pytest.raises(InputError, match="trial 0 was scored on probe/other and its run .* is gone"):
        run_sweep(write_sweep(in_tmp / "s.yaml", "probe/test/logp/chosen"), 1)
