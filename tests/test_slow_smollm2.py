"""Slow tier: the real embedded SmolLM2-135M (dequantized GGUF) through the real CLI, in subprocesses."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, run_dir_of, run_dynlab

pytestmark = pytest.mark.slow
SMALL = ("--data.init_args.probe_size=4", "--data.init_args.num_train=16", "--data.init_args.num_heldout=8")


def fit(cwd: Path, stage: str, *extra: str) -> Path:
    proc = run_dynlab("fit", "--config", str(CONFIGS / f"{stage}.yaml"), *SMALL, *extra, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir_of(proc, cwd)


def probe_rows(run: Path) -> dict[int, dict[str, float]]:
    with open(run / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    return {int(r["step"]): r for r in rows if "probe/train/logp/chosen" in r}


def test_dpo_embedded_default_two_steps(tmp_path):
    run = fit(tmp_path, "dpo", "--trainer.max_steps=2")
    probes = probe_rows(run)
    assert sorted(probes) == [0, 2]
    for key, value in probes[2].items():
        assert math.isfinite(value), key
    # a pretrained instruct model: argmax mass above the chosen response on every example
    assert probes[0]["probe/train/argmax_logp/chosen"] >= probes[0]["probe/train/logp/chosen"]
    assert (run / "export" / "model.safetensors").is_file()


def test_extend_sft_to_dpo_hand_off(tmp_path):
    sft = fit(tmp_path, "extend_sft", "--trainer.max_steps=2")
    dpo = fit(tmp_path, "dpo", "--trainer.max_steps=1", f"--model.init_args.init_from={sft / 'export'}")
    after_sft, dpo_start = probe_rows(sft)[2], probe_rows(dpo)[0]
    for t in ("chosen", "rejected", "irr_hum"):
        assert dpo_start[f"probe/test/logp/{t}"] == pytest.approx(after_sft[f"probe/test/logp/{t}"], rel=1e-4)
