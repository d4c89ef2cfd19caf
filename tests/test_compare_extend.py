"""Slow tier: ``scripts/compare_extend.sh`` end to end on the tiny overlay (four fits, plot, generations, two judge
runs with the tiny model as judge, the report), and a second call reusing the finished runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.slow


def compare(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONFIGS": str(CONFIGS), "CONFIG_OVERLAY": str(CONFIGS / "tiny.yaml"), "JUDGE": "hf:tiny",
           "DPO_STEPS": "3", "SAMPLES": "1", "MAX_NEW_TOKENS": "8", "THREADS": "1", "WANDB_MODE": "disabled",
           "DYNLAB": str(Path(sys.executable).parent / "dynlab"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "compare_extend.sh")], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_compare_extend_on_tiny(tmp_path):
    compare(tmp_path)
    out = tmp_path / "runs" / "compare-extend"
    report = (out / "report.md").read_text(encoding="utf-8")
    for section in ("## Probe dynamics", "## Repetition of generations", "## Pairwise judge", "## Wall time"):
        assert section in report
    assert (out / "figures" / "overlay.png").is_file()
    for name in ("sft", "extend_sft", "sft_dpo", "extend_dpo"):
        rows = [json.loads(x) for x in (out / "gen" / f"{name}.jsonl").read_text().splitlines()]
        assert {r["mode"] for r in rows} == {"greedy", "sampled"} and f"| {name} (greedy) |" in report
    summary = json.loads((out / "judge" / "summary.json").read_text())
    assert summary["a"]["label"] == "ExtendSFT→DPO" and summary["overall"]["pairs"] == 2 * 4  # probe_size 4 (tiny)
    calibration = json.loads((out / "judge_calibration" / "summary.json").read_text())
    assert calibration["a"]["label"] == "chosen y+" and calibration["overall"]["pairs"] == 4
    # the DPO runs logged their generations while training
    assert (tmp_path / "runs" / "dpo" / "compare-extend-sft" / "generations" / "step_00000000.jsonl").is_file()
    # a second call reuses the four finished runs
    again = compare(tmp_path)
    assert again.stderr.count("== reusing runs/") == 4 and "== fit " not in again.stderr
