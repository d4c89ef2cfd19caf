"""The CUDA-only paths (``pytest -m gpu``; skipped without a CUDA device): a bf16-mixed fit on one GPU, DDP and FSDP
on two, seeded sampling on CUDA, scoring a CPU policy's pairs on the GPU, activation checkpointing on CUDA, and the
memory estimate against ``torch.cuda.max_memory_allocated``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from dynlab.cli import main
from tests.conftest import CONFIGS, run_dir_of, run_dynlab

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
GPU = ["--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed"]


def metrics(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def assert_finite_probes(rows: list[dict[str, float]], steps: list[int]) -> None:
    probes = [r for r in rows if "probe/train/logp/chosen" in r]
    assert [int(r["step"]) for r in probes] == steps
    for r in probes:
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith("probe/")), r


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_fit_on_one_gpu_under_bf16_mixed(stage, in_tmp):
    main(["fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--config", str(CONFIGS / "tiny.yaml"), *GPU,
          "--trainer.devices=1", "--model.init_args.activation_checkpointing=true"])
    run = next(Path("runs", stage).glob("version_*"))
    rows = metrics(run)
    assert_finite_probes(rows, [0, 3, 6])
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


@two_gpus
def test_ddp_on_two_gpus(in_tmp):
    proc = run_dynlab("fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"), *GPU,
                      "--trainer.devices=2", "--trainer.strategy=ddp", cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_finite_probes(metrics(run_dir_of(proc, in_tmp)), [0, 3, 6])


@two_gpus
def test_fsdp_overlay_on_two_gpus(in_tmp):
    """configs/strategies/fsdp.yaml (full sharding, bf16-mixed, Lightning's own activation checkpointing): trains
    and exports a whole model."""
    proc = run_dynlab("fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
                      "--config", str(CONFIGS / "strategies" / "fsdp.yaml"), "--trainer.devices=2", cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir_of(proc, in_tmp)
    assert (run / "export" / "config.json").is_file()
    assert all(math.isfinite(r["train/loss"]) for r in metrics(run) if "train/loss" in r)


def test_seeded_sampling_on_cuda_repeats(tiny_spec):
    from dynlab.models.generate import generate_token_ids
    from dynlab.models.load import load_model, load_tokenizer

    model, tok = load_model(tiny_spec).cuda(), load_tokenizer(tiny_spec)
    prompts = [[5, 6, 7], [8, 9]]
    runs = [generate_token_ids(model, tok, prompts, max_new_tokens=8, seed=3) for _ in range(2)]
    assert runs[0] == runs[1] and all(len(s) > 0 for s in runs[0])


def test_pairs_of_a_cpu_policy_are_scored_on_the_gpu_and_it_moves_back(tiny_spec):
    from dynlab.modules import DPOModule

    module = DPOModule(policy=tiny_spec)
    pairs = [{"index": i, "prompt_ids": [5 + i, 6, 7], "responses": {"chosen": [8, 9, 10], "rejected": [11, 12]}}
             for i in range(3)]
    out = module.score_pairs(pairs, batch_size=2)
    assert module.policy.device.type == "cpu" and len(out) == 3
    assert all(math.isfinite(float(v)) for row in out for v in row.values() if isinstance(v, (int, float)))


def test_checkpointing_gives_the_same_gradients_on_cuda(tiny_spec):
    from dynlab.modules import SFTModule
    from tests.test_activation_checkpointing import loss_and_grads, pairs, quiet

    plain, ckpt = (quiet(SFTModule(policy=tiny_spec, activation_checkpointing=on)).cuda() for on in (False, True))
    batch = {k: v[:3].cuda() for k, v in pairs(plain.policy.config.vocab_size).items()}
    loss0, grads0, _ = loss_and_grads(plain, batch)
    loss1, grads1, recomputed = loss_and_grads(ckpt, batch)
    assert recomputed > 0 and torch.allclose(loss0, loss1, rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(grads0, grads1):
        assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_estimate_against_the_cuda_peak(checkpointing):
    """One AdamW step of SFT on a 4-layer, hidden-512 Llama (float32, 8 rows of 256 tokens): the peak allocated
    memory is within [0.4, 1.5] of the estimate's total (the estimate adds terms that are never all live at once;
    the peak also holds transient buffers it does not count)."""
    from dynlab.data.tokenize import collate_sequences
    from dynlab.models.load import ModelSpec
    from dynlab.models.memory import memory_estimate
    from dynlab.modules import SFTModule
    from tests.test_activation_checkpointing import quiet

    spec = ModelSpec(name_or_path="tiny", tiny_config={"hidden_size": 512, "intermediate_size": 1376,
                                                       "num_hidden_layers": 4, "num_attention_heads": 8,
                                                       "num_key_value_heads": 4})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    module = quiet(SFTModule(policy=spec, activation_checkpointing=checkpointing)).cuda()
    config = module.policy.config
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, config.vocab_size, (64,), generator=gen).tolist() for _ in range(8)]
    responses = [torch.randint(2, config.vocab_size, (192,), generator=gen).tolist() for _ in range(8)]
    batch = {k: v.cuda() for k, v in collate_sequences(prompts, responses, pad_token_id=0).items()}
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=1e-4)
    module.policy.train()
    module.training_step(batch, 0).backward()
    optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    n = sum(p.numel() for p in module.policy.parameters())
    est = memory_estimate(n, reference="none", batch_tokens=8 * 256, response_tokens=8 * 192,
                          hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                          vocab_size=config.vocab_size, activation_checkpointing=checkpointing)
    assert 0.4 * est["total"] <= peak <= 1.5 * est["total"], (peak, est)
