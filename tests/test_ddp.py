"""Slow tier: 2-rank CPU DDP (gloo) through a real `dynlab fit` subprocess gives the numbers of one process."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pandas as pd
import pytest

from dynlab.tracking.trajectory import KEY_COLUMNS, read_trajectory
from tests.conftest import CONFIGS, run_dir_of, run_dynlab

pytestmark = pytest.mark.slow


def fit(cwd: Path, stage: str, *extra: str) -> tuple[Path, float]:
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = run_dynlab("fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
                      "--trainer.accelerator=cpu", *extra, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir_of(proc, cwd), time.perf_counter() - start


def metrics(run: Path) -> pd.DataFrame:
    with open(run / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    return pd.DataFrame(rows).groupby("step").first()


@pytest.mark.parametrize(("stage", "lora"), [("sft", False), ("extend_sft", False), ("dpo", False), ("sft", True),
                                             ("dpo", True)],
                         ids=["sft", "extend_sft", "dpo", "sft-lora", "dpo-lora"])
def test_two_ranks_match_one_process(stage, lora, tmp_path):
    adapter = ("--config", str(CONFIGS / "lora.yaml")) if lora else ()
    one, t1 = fit(tmp_path / "one", stage, *adapter, "--trainer.devices=1", "--data.init_args.batch_size=4")
    two, t2 = fit(tmp_path / "two", stage, *adapter, "--trainer.devices=2", "--trainer.strategy=ddp",
                  "--data.init_args.batch_size=2")  # 2 ranks x 2 = the same global batch
    print(f"{stage}: 1 rank {t1:.1f}s, 2 ranks {t2:.1f}s")
    m1, m2 = metrics(one), metrics(two)
    keys = [k for k in m1.columns if k.startswith(("probe/", "train/"))]
    assert set(keys) <= set(m2.columns) and any(k.startswith("probe/") for k in keys)
    pd.testing.assert_frame_equal(m1[keys], m2[keys], rtol=1e-4, atol=1e-4)
    # the trajectory: written once (rank 0), every probe example exactly once, same numbers
    t1_, t2_ = read_trajectory(one), read_trajectory(two)
    assert not t2_.duplicated(list(KEY_COLUMNS)).any() and len(t1_) == len(t2_)
    cols = [*KEY_COLUMNS, "logp", "dlogp", "argmax_logp", "entropy"]
    pd.testing.assert_frame_equal(t1_[cols], t2_[cols], rtol=1e-4, atol=1e-3)
    assert (two / "export" / "model.safetensors").is_file()
    assert (two / "adapter" / "adapter_model.safetensors").is_file() == lora
    assert not (tmp_path / "two" / "runs" / stage / "version_1").exists()  # one run directory, not one per rank


def test_dynamics_callback_under_ddp_matches_one_process(tmp_path):
    """DynamicsCallback works on rank 0 while the other rank trains on; its predictions equal one process's."""
    callback = ("--trainer.callbacks+=dynlab.dynamics.DynamicsCallback", "--trainer.callbacks.num_examples=2")
    one, _ = fit(tmp_path / "one", "dpo", "--trainer.devices=1", "--data.init_args.batch_size=4", *callback)
    two, _ = fit(tmp_path / "two", "dpo", "--trainer.devices=2", "--trainer.strategy=ddp",
                 "--data.init_args.batch_size=2", *callback)
    columns = [*KEY_COLUMNS, "dyn_observed", "dyn_predicted", "dyn_predicted_sgd"]
    d1, d2 = (read_trajectory(run).dropna(subset=["dyn_observed"])[columns].reset_index(drop=True)
              for run in (one, two))
    assert len(d1) == 2 * 2 * 11  # steps 0 and 3 of 6, 2 rows x 11 types
    pd.testing.assert_frame_equal(d1, d2, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("stage", ["spin", "online_dpo"])
def test_on_policy_sampling_under_ddp_each_rank_samples_its_shard(stage, tmp_path):
    """negatives: policy and pairs: policy_ranked on 2 ranks: every step each rank samples (and ranks) the prompts of
    its own shard with its own seed, keeps them in its own file, and the run logs and exports as one process does."""
    import json

    ranker = ("--model.init_args.ranker=hf:tiny",) if stage == "online_dpo" else ()
    two, _ = fit(tmp_path / "two", stage, "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=2",
                 "--data.init_args.batch_size=2", "--model.init_args.probe_every_n_steps=2",
                 "--model.init_args.sampling.max_new_tokens=6", *ranker)
    for step in (0, 1):
        files = [two / "samples" / f"step_{step:08d}_rank{rank}.jsonl" for rank in (0, 1)]
        rows = [[json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()] for f in files]
        assert all(len(r) == 2 for r in rows), rows  # batch_size pairs per rank
        indices = [{row["index"] for row in r} for r in rows]
        assert not indices[0] & indices[1]  # disjoint shards
        seeds = [{row["seed"] for row in r} for r in rows]
        assert len(seeds[0]) == len(seeds[1]) == 1 and seeds[0] != seeds[1]
        if stage == "online_dpo":
            assert all(len(row["samples"]) == 2 and "wins" in row for r in rows for row in r)
    m = metrics(two)
    assert {0, 2} <= set(m.index) and "train/sample/length" in m.columns
    assert (two / "export" / "model.safetensors").is_file()
