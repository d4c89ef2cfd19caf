"""``dynlab reproduce`` (make reproduce) on the tiny overlay and a slice of the shared HH rows: the four stages, the
report and the timing split; a rerun reuses finished stages and resumes an interrupted one; changed arguments and bad
paths are refused. The recipe at its real size on SmolLM2 is the slow tier's (tests/test_signatures.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dynlab.reproduce import STAGES
from tests.conftest import CONFIGS, SHARED_PROBE_FILE, run_dynlab

TINY = ("--config", str(CONFIGS / "tiny.yaml"))


@pytest.fixture(scope="module")
def hh_slice(tmp_path_factory) -> Path:
    """The first 64 shared HH rows (the recipe reads 40 training and 40 held-out rows at most)."""
    if not SHARED_PROBE_FILE.is_file():
        pytest.skip(f"the shared HH rows are not at {SHARED_PROBE_FILE}")
    path = tmp_path_factory.mktemp("hh") / "hh.jsonl"
    path.write_text("".join(SHARED_PROBE_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:64]),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, hh_slice) -> tuple[Path, Path, str]:
    cwd = tmp_path_factory.mktemp("reproduce")
    proc = run_dynlab("reproduce", "--data", str(hh_slice), "--out", "out", *TINY, cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, cwd / "out", proc.stdout


def test_four_stages_report_signatures_and_timing(reproduced):
    cwd, out, stdout = reproduced
    for stage in STAGES:
        run = out / stage.run
        assert (run / "export" / "config.json").is_file(), stage
        assert (run / "timing.json").is_file(), stage
    # both DPO runs start from their stage-1 export (policy and reference)
    for stage, parent in (("dpo/from-sft", "sft/reproduce"), ("dpo/from-extend", "extend_sft/reproduce")):
        config = (out / stage / "config.yaml").read_text(encoding="utf-8")
        assert str(out / parent / "export") in config
    assert (out / "report.html").is_file() and "signatures (PAPER_NOTES §9) on probe_train" in stdout
    timing = json.loads((out / "timing.json").read_text(encoding="utf-8"))
    assert set(timing["stages"]) == {s.name for s in STAGES}
    total = timing["total"]
    assert total["probe_eval_s"] > 0 and total["train_s"] > 0 and total["wall_s"] >= total["train_s"]
    assert "wall time" in stdout and "probe evaluation" in stdout


def test_probe_train_irr_train_is_trained_on(reproduced):
    # the shared rows' own irr_train points at rows outside the 40-pair subset; the recipe rebuilds it from the subset
    _, out, _ = reproduced
    probes = [json.loads(x) for x in (out / "sft/reproduce/probes/probe_train.jsonl").read_text().splitlines()]
    config = (out / "sft/reproduce/config.yaml").read_text(encoding="utf-8")
    assert "rebuild_irr_train: true" in config
    rows = [json.loads(x) for x in Path(str(config.split("source: ")[1].split()[0])).read_text().splitlines()]
    trained = {r["chosen"] for r in rows[:16]}  # tiny.yaml: num_train 16
    assert probes and all(p["irr_train"] in trained for p in probes)


def test_rerun_reuses_and_resumes(reproduced, hh_slice):
    cwd, out, _ = reproduced
    # an interrupted last stage: its export is gone, its last.ckpt is there
    last = out / STAGES[-1].run
    shutil.rmtree(last / "export")
    assert (last / "checkpoints" / "last.ckpt").is_file()
    proc = run_dynlab("reproduce", "--data", str(hh_slice), "--out", "out", *TINY, cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in STAGES[:-1]:
        assert f"{stage.name} already finished" in proc.stderr
    assert f"resuming {STAGES[-1].name}" in proc.stderr
    assert (last / "export" / "config.json").is_file()


def test_changed_arguments_are_refused(reproduced, hh_slice):
    cwd, out, _ = reproduced
    proc = run_dynlab("reproduce", "--data", str(hh_slice), "--out", "out", *TINY, "--", "--seed_everything=1",
                      cwd=cwd, timeout=300)
    assert proc.returncode == 2 and "--fresh" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_data_file_is_one_line(tmp_path):
    proc = run_dynlab("reproduce", "--data", str(tmp_path / "nope.jsonl"), "--out", "out", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
