"""The LoRA benchmark's machinery at toy size on the tiny model: its workers (in-process and as the fresh process the
benchmark spawns), the figures it aggregates from them and the report's table; the systems' first losses must be
log 2 and agree, and dynlab's and TRL's adapters must start from the same weights."""

from __future__ import annotations

import math

import pytest

from benchmarks import lora, report
from tests.conftest import SHARED_PROBE_FILE

TOY = ["--models", "tiny", "--rounds", "1", "--warmup", "1", "--steps", "1", "--pairs", "2", "--max-length", "48",
       "--max-prompt-length", "24", "--r", "4", "--alpha", "8"]


@pytest.fixture(scope="module")
def toy():
    if not SHARED_PROBE_FILE.is_file():
        pytest.skip(f"no {SHARED_PROBE_FILE}")
    from benchmarks.common import hh_rows, setup_torch

    args = lora.parse_args(TOY)
    setup_torch(args)
    return args, hh_rows(limit=2 * args.pairs)


@pytest.fixture(scope="module")
def dynlab_records(toy):
    args, rows = toy
    return [lora.run_worker(s, "tiny", 0, args, rows) for s in ("dynlab_lora", "dynlab_full")]


def check_record(rec: dict, args) -> None:
    assert len(rec["step_seconds"]) == len(rec["tokens"]) == args.steps
    assert all(t > 0 for t in rec["step_seconds"]) and all(n > 0 for n in rec["tokens"])
    assert rec["sequences_per_step"] == 2 * args.pairs
    assert max(rec["padded_width"]) <= args.max_length
    assert 0 < rec["rss_start_mb"] and 0 < rec["rss_after_load_mb"] <= rec["peak_rss_mb"]
    assert rec["cuda_peak_mb"] is None  # cpu
    assert rec["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0 / policy = reference at step 0


def test_dynlab_workers_and_figures(toy, dynlab_records):
    args, _ = toy
    lora_rec, full_rec = dynlab_records
    for rec in dynlab_records:
        check_record(rec, args)
    assert lora_rec["tokens"] == full_rec["tokens"]  # the same batches
    assert lora_rec["parameters"] == full_rec["parameters"] == full_rec["trainable_parameters"]
    # r x (in + out) per adapted linear layer: 7 per tiny Llama layer, 2 layers
    assert lora_rec["lora_init"]["matrices"] == 14 and full_rec["lora_init"]["matrices"] == 0
    assert 0 < lora_rec["trainable_parameters"] < full_rec["trainable_parameters"] / 5

    out = lora.aggregate(dynlab_records, "peak_rss_mb")
    assert set(out["systems"]) == {"dynlab_lora", "dynlab_full"}
    assert "lora_over_trl_tokens_per_second" not in out  # no TRL record
    mem = out["lora_over_full_peak_memory"]
    assert mem["median"] == pytest.approx(lora_rec["peak_rss_mb"] / full_rec["peak_rss_mb"])
    assert mem["target"] == "<= 0.6" and mem["pass"] == (mem["median"] <= 0.6)
    step = out["lora_over_full_step_seconds"]
    assert step["median"] == pytest.approx(lora_rec["step_seconds"][0] / full_rec["step_seconds"][0])
    for name, rec in zip(("dynlab_lora", "dynlab_full"), dynlab_records):
        s = out["systems"][name]
        assert s["tokens_per_second"]["median"] == pytest.approx(rec["tokens"][0] / rec["step_seconds"][0])
        assert s["training_adds_rss_mb"]["median"] == pytest.approx(rec["peak_rss_mb"] - rec["rss_after_load_mb"])
        assert out["first_step_loss"][name] == rec["first_loss"]


def test_trl_lora_agrees_with_dynlab_at_init_and_the_report_renders(toy, dynlab_records):
    pytest.importorskip("trl")
    args, rows = toy
    trl_rec = lora.run_worker("trl_lora", "tiny", 0, args, rows)
    check_record(trl_rec, args)
    lora_rec = dynlab_records[0]
    assert trl_rec["tokens"] == lora_rec["tokens"]  # TRL trained on dynlab's exact token ids
    # the same peft config on the same base: the same trainable parameters and the same A matrices at init
    assert trl_rec["trainable_parameters"] == lora_rec["trainable_parameters"]
    assert trl_rec["lora_init"] == lora_rec["lora_init"]
    assert trl_rec["first_loss"] == pytest.approx(lora_rec["first_loss"], abs=1e-6)

    run = lora.aggregate([*dynlab_records, trl_rec], "peak_rss_mb")
    speed = run["lora_over_trl_tokens_per_second"]
    assert speed["target"] == ">= 1.5" and speed["pass"] == (speed["median"] >= 1.5) and speed["median"] > 0
    result = {"machine": {"device": "cpu", "cpu_model": "x", "cpu_count": 2, "torch_threads": 1, "dtype": "fp32",
                          "load_average_at_start": [0.0], "load_average_at_end": [0.0]},
              "settings": {**{k: getattr(args, k) for k in ("rounds", "warmup", "steps", "pairs", "max_length",
                                                            "r", "alpha")},
                           "lora_dropout": 0.0, "target_modules": "all-linear", "memory": "peak RSS"},
              "runs": {"tiny": run}}
    table = "\n".join(report.lora(result))
    for name in lora.SYSTEMS:
        assert f"| tiny (0.1M) | {name} |" in table
    assert "dynlab LoRA / TRL+peft, tokens/s" in table and "dynlab LoRA / full DPO, peak memory" in table


def test_worker_process_prints_its_json_line(toy):
    """The fresh process the benchmark spawns per (system, round): one JSON line back, its own peak RSS."""
    args, _ = toy
    rec = lora.spawn_worker("dynlab_lora", "tiny", 0, args)
    check_record(rec, args)
    assert rec["system"] == "dynlab_lora" and rec["round"] == 0 and rec["model"] == "tiny"
