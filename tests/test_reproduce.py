"""``dynlab reproduce`` (make reproduce) on the tiny overlay and a slice of the shared HH rows: the four stages, the
report and the timing split; a rerun reuses finished stages and resumes an interrupted one; a changed recipe, runs
without a recipe and bad paths are refused; a stop is passed on to the stage. The recipe at its real size on SmolLM2
is the slow tier's (tests/test_signatures.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dynlab.reproduce import DEFAULT_STAGES, stage_runs
from tests.conftest import CONFIGS, SHARED_PROBE_FILE, run_dynlab

TINY = ("--config", str(CONFIGS / "tiny.yaml"))


@pytest.fixture(scope="module")
def hh_slice(module_tmp) -> Path:
    """The first 64 shared HH rows (the recipe reads 40 training and 40 held-out rows at most)."""
    if not SHARED_PROBE_FILE.is_file():
        pytest.skip(f"the shared HH rows are not at {SHARED_PROBE_FILE}")
    path = module_tmp("hh") / "hh.jsonl"
    path.write_text("".join(SHARED_PROBE_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:64]),
                    encoding="utf-8")
    return path


def reproduce(cwd: Path, data: Path, *extra: str, out: str = "out", env: dict | None = None
              ) -> subprocess.CompletedProcess:
    return run_dynlab("reproduce", "--data", str(data), "--out", out, *TINY, *extra, cwd=cwd, timeout=900, env=env)


@pytest.fixture(scope="module")
def reproduced(module_tmp, hh_slice) -> tuple[Path, Path, str]:
    cwd = module_tmp("reproduce")
    proc = reproduce(cwd, hh_slice, "--record", "record.json", "--keep-checkpoints")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, cwd / "out", proc.stdout


def test_four_stages_report_signatures_and_timing(reproduced):
    cwd, out, stdout = reproduced
    runs = stage_runs(out)
    assert list(runs) == list(DEFAULT_STAGES)
    for name, run in runs.items():
        assert (run / "export" / "config.json").is_file(), name
        assert (run / "timing.json").is_file(), name
        assert (run / "checkpoints" / "last.ckpt").is_file(), name  # --keep-checkpoints
    # both DPO runs start from their stage-1 export (policy and reference)
    for stage, parent in (("dpo", "sft"), ("dpo_extend", "extend")):
        assert str(runs[parent] / "export") in (runs[stage] / "config.yaml").read_text(encoding="utf-8")
    assert (out / "report.html").is_file()
    assert "signatures (PAPER_NOTES §9) on probe_train" in stdout and "on probe_test" in stdout
    timing = json.loads((out / "timing.json").read_text(encoding="utf-8"))
    assert set(timing["stages"]) == set(DEFAULT_STAGES)
    total = timing["total"]
    assert total["probe_eval_s"] > 0 and total["train_s"] > 0 and total["wall_s"] >= total["train_s"]
    assert "wall time" in stdout and "probe evaluation" in stdout
    record = json.loads((cwd / "record.json").read_text(encoding="utf-8"))
    assert record["total"] == total and {s["id"] for s in record["signatures"]["train"]} >= {4, 12, 16}


def test_probe_irr_train_is_trained_on(reproduced):
    # the shared rows' own irr_train points at rows outside the training subset; the recipe rebuilds it from the subset
    _, out, _ = reproduced
    run = stage_runs(out)["sft"]
    config = (run / "config.yaml").read_text(encoding="utf-8")
    assert "rebuild_irr_train: true" in config
    rows = [json.loads(x) for x in Path(config.split("source: ")[1].split()[0]).read_text().splitlines()]
    trained = {r["chosen"] for r in rows[:16]}  # tiny.yaml: num_train 16
    probes = [json.loads(x) for x in (run / "probes/probe_train.jsonl").read_text().splitlines()]
    assert probes and all(p["irr_train"] in trained for p in probes)


def test_rerun_reuses_and_resumes(reproduced, hh_slice):
    cwd, out, _ = reproduced
    runs = stage_runs(out)
    # an interrupted last stage: its export is gone, its last.ckpt is there
    last = runs[DEFAULT_STAGES[-1]]
    shutil.rmtree(last / "export")
    assert (last / "checkpoints" / "last.ckpt").is_file()
    proc = reproduce(cwd, hh_slice)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in DEFAULT_STAGES[:-1]:
        assert f"{stage} already finished" in proc.stderr
    assert f"resuming {DEFAULT_STAGES[-1]}" in proc.stderr
    assert (last / "export" / "config.json").is_file()
    # without --keep-checkpoints a finished stage keeps its export, not its checkpoints (reused or just finished)
    for stage, run in runs.items():
        assert f"removed {stage}'s checkpoints" in proc.stderr
        assert not list(run.rglob("*.ckpt")) and (run / "export" / "config.json").is_file(), stage


def test_a_stage_run_again_runs_the_dpo_started_from_it_again(reproduced, hh_slice):
    cwd, out, _ = reproduced
    runs = stage_runs(out)
    shutil.rmtree(runs["extend"])  # e.g. deleted by hand to redo it
    before = (runs["dpo_extend"] / "export" / "config.json").stat().st_mtime_ns
    proc = reproduce(cwd, hh_slice)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running extend" in proc.stderr and "running dpo_extend" in proc.stderr
    assert "sft already finished" in proc.stderr and "dpo already finished" in proc.stderr
    assert (runs["dpo_extend"] / "export" / "config.json").stat().st_mtime_ns != before


@pytest.mark.slow  # another four tiny stages
def test_a_changed_recipe_is_refused(reproduced, hh_slice, tmp_path):
    cwd, out, _ = reproduced
    proc = reproduce(cwd, hh_slice, "--", "--seed_everything=1")  # other arguments
    assert proc.returncode == 2 and "--fresh" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    overlay = tmp_path / "overlay.yaml"  # the same arguments, but a config file whose contents changed
    overlay.write_text("seed_everything: 0\n")
    first = reproduce(tmp_path, hh_slice, "--config", str(overlay), "--", "--trainer.max_steps=1",
                      "--model.init_args.probe_every_n_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    overlay.write_text("seed_everything: 1\n")
    again = reproduce(tmp_path, hh_slice, "--config", str(overlay), "--", "--trainer.max_steps=1",
                      "--model.init_args.probe_every_n_steps=1")
    assert again.returncode == 2 and "config files or data" in again.stderr


def test_runs_without_a_recipe_are_refused(reproduced, hh_slice, tmp_path):
    _, out, _ = reproduced
    shutil.copytree(out / "sft", tmp_path / "out" / "sft")
    proc = reproduce(tmp_path, hh_slice)
    assert proc.returncode == 2 and "recipe.json" in proc.stderr and "--fresh" in proc.stderr


@pytest.mark.slow  # another four tiny stages
def test_sft_only_flat_rows(hh_slice, tmp_path):
    # any preference file dynlab reads: flat {prompt, chosen, rejected} rows, none of the paper's probe types
    flat = tmp_path / "flat.jsonl"
    rows = [json.loads(x) for x in hh_slice.read_text().splitlines()]
    flat.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    proc = reproduce(tmp_path, flat, "--", "--trainer.max_steps=1", "--model.init_args.probe_every_n_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((run / "export").is_dir() for run in stage_runs(tmp_path / "out").values())


@pytest.mark.slow  # another four tiny stages
def test_sigterm_is_passed_on_and_the_rerun_resumes(hh_slice, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "dynlab.cli", "reproduce", "--data", str(hh_slice), "--out", "out", *TINY,
            "--", "--trainer.max_steps=40", "--model.init_args.probe_every_n_steps=20"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    metrics = tmp_path / "out" / "sft" / "reproduce" / "metrics.csv"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 3) and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "rerun the same command to resume it" in stderr
    # the stage stopped too (its lock is free), and the same command goes on from there
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sft in" in again.stderr


def test_missing_data_file_is_one_line(tmp_path):
    proc = run_dynlab("reproduce", "--data", str(tmp_path / "nope.jsonl"), "--out", "out", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_stages_and_lr_scale_pick_and_scale(reproduced, hh_slice, tmp_path):
    """``--stages sft,dpo`` runs SFT -> DPO alone (in a fresh --out); ``--lr-scale`` multiplies every stage's learning
    rate; a stage without its parent and a bad scale are refused in one line. The stages are make compare-onpolicy's:
    off-policy DPO, SPIN, online DPO (ranked by the judge DYNLAB_RANKER names) and SPPO, each from the same SFT export
    with the same steps, and the overlay figure draws all four."""
    family = ["sft", "dpo", "dpo_onpolicy", "dpo_online", "dpo_sppo"]
    proc = reproduce(tmp_path, hh_slice, "--stages", "dpo,sft,dpo_onpolicy,dpo_online,dpo_sppo", "--lr-scale", "2",
                     env={"DYNLAB_RANKER": "hf:tiny"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = stage_runs(tmp_path / "out")
    assert list(runs) == family
    model = {name: yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["model"]["init_args"]
             for name, run in runs.items()}
    assert len({model[n]["init_from"] for n in family[1:]}) == 1
    assert model["dpo_online"]["pairs"] == "policy_ranked" and model["dpo_online"]["ranker"] == "hf:tiny"
    assert model["dpo_sppo"]["loss_type"] == "sppo_hard" and model["dpo"]["loss_type"] == "sigmoid"
    rows = [json.loads(line) for f in sorted((runs["dpo_online"] / "samples").glob("step_*_rank0.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines()]
    assert rows and all(len(r["samples"]) == 2 and "wins" in r for r in rows)
    plot = run_dynlab("plot", *(str(runs[n]) for n in family[1:]), "--out", str(tmp_path / "figures"),
                      cwd=tmp_path, timeout=300)
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert (tmp_path / "figures" / "overlay.png").stat().st_size > 10_000
    onpolicy = runs.pop("dpo_onpolicy")  # the same DPO from the SFT export, y- sampled from the policy (§15)
    assert "negatives: policy" in (onpolicy / "config.yaml").read_text(encoding="utf-8")
    assert any((onpolicy / "samples").glob("step_*_rank0.jsonl"))
    assert "| 15 |" in proc.stdout and "dpo, dpo_onpolicy" in proc.stdout
    for name, run in runs.items():
        config = (run / "config.yaml").read_text(encoding="utf-8")
        stacked = [CONFIGS / "sft.yaml", CONFIGS / "reproduce" / "sft.yaml", CONFIGS / "tiny.yaml"] if name == "sft" \
            else [CONFIGS / "dpo.yaml", CONFIGS / "reproduce" / "dpo.yaml", CONFIGS / "tiny.yaml"]
        from dynlab.reproduce import stacked_lr

        assert f"lr: {2 * stacked_lr(stacked)}" in config, name
    assert (tmp_path / "out" / "report.html").is_file() and "on probe_train" in proc.stdout
    # the recorded stages are kept when another subset runs beside them
    again = reproduce(tmp_path, hh_slice, "--stages", "sft", "--lr-scale", "2")
    assert again.returncode == 0 and "sft already finished" in again.stderr
    assert list(stage_runs(tmp_path / "out")) == family
    for bad, message in ((("--stages", "dpo"), "starts from stage sft"), (("--stages", "sft,ppo"), "unknown stage"),
                         (("--lr-scale", "0"), "--lr-scale")):
        proc = reproduce(tmp_path, hh_slice, *bad, out="refused")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "refused").exists()
