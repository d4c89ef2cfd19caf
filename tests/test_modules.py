"""Each module fits on the tiny overlay through the real CLI: probe metrics logged at step 0 and on the cadence,
the resolved config saved, the policy exported; ExtendSFT -> DPO through init_from; cached reference log-probs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from dynlab.cli import main
from dynlab.data.probes import PROBE_TYPES
from tests.conftest import CONFIGS


def fit(stage: str, *extra: str) -> Path:
    main(["fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--config", str(CONFIGS / "tiny.yaml"), *extra])
    runs = sorted(Path("runs", stage).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return runs[-1]


def read_metrics(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def probe_rows(rows: list[dict[str, float]]) -> dict[int, dict[str, float]]:
    return {int(r["step"]): r for r in rows if "probe/train/logp/chosen" in r}


@pytest.mark.parametrize("stage", ["sft", "extend_sft", "dpo"])
def test_fit_on_tiny(stage, in_tmp):
    run = fit(stage)
    rows = read_metrics(run)
    probes = probe_rows(rows)
    assert sorted(probes) == [0, 3, 6]  # step 0, every 3 steps, and the last step
    for split in ("train", "test"):
        for t in set(PROBE_TYPES) - {"chosen_initial"}:
            assert math.isfinite(probes[6][f"probe/{split}/logp/{t}"])
            assert probes[0][f"probe/{split}/dlogp/{t}"] == 0.0
    assert probes[0]["probe/train/argmax_logp/chosen"] >= probes[0]["probe/train/logp/chosen"]
    # the paper's code overwrote every type's argmax metrics with the last type's: each type keeps its own here
    argmax = {t: probes[6][f"probe/train/argmax_logp/{t}"] for t in ("chosen", "rejected", "random_nonhum")}
    assert len(set(argmax.values())) == 3
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    if stage == "dpo":
        assert any("train/rewards/margin" in r for r in rows)
        assert probes[0]["probe/train/reward_margin"] == 0.0 and "probe/test/ranking_accuracy" in probes[6]
    else:
        assert probes[6]["probe/train/logp/chosen"] > probes[0]["probe/train/logp/chosen"]  # SFT learns chosen
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    export = AutoModelForCausalLM.from_pretrained(run / "export")
    assert export.config.num_hidden_layers == 2 and (run / "export" / "tokenizer.json").is_file()


def test_extend_sft_hands_off_to_dpo_through_init_from(in_tmp):
    sft_run = fit("extend_sft")
    exported = AutoModelForCausalLM.from_pretrained(sft_run / "export")
    for init_from in (str(sft_run / "export"), str(sft_run / "checkpoints" / "last.ckpt")):
        dpo_run = fit("dpo", f"--model.init_args.init_from={init_from}", "--trainer.max_steps=1")
        probes = probe_rows(read_metrics(dpo_run))
        assert sorted(probes) == [0, 1]
    # the DPO policy started from the ExtendSFT weights: its step-0 probe logp is the ExtendSFT run's final one
    sft_final = probe_rows(read_metrics(sft_run))[6]["probe/train/logp/rejected"]
    dpo_start = probes[0]["probe/train/logp/rejected"]
    assert dpo_start == pytest.approx(sft_final, rel=1e-4)
    assert exported is not None


def test_cached_reference_logps_are_the_live_reference_through_the_first_epoch(in_tmp):
    # 8 pairs a batch: the tiny model's per-sequence log-probs then depend on the batch they are computed in
    # (a cache built on ordered batches gave a step-0 reward margin of 7.6e-7, not 0)
    args = ("--trainer.max_steps=8", "--trainer.log_every_n_steps=1", "--model.init_args.probe_every_n_steps=0",
            "--data.init_args.num_train=64", "--data.init_args.batch_size=8")  # 8 steps = the first epoch
    live = read_metrics(fit("dpo", *args))
    cached = read_metrics(fit("dpo", *args, "--model.init_args.precompute_ref_logps=true"))
    step0 = next(r for r in cached if "train/loss" in r)
    assert step0["train/loss"] == float(torch.tensor(math.log(2)))  # policy = reference: logit exactly 0
    assert step0["train/rewards/chosen"] == step0["train/rewards/rejected"] == 0.0
    for key in ("train/loss", "train/rewards/margin", "train/rewards/chosen"):
        a = [r[key] for r in live if key in r]
        b = [r[key] for r in cached if key in r]
        assert len(a) == 8 and a == b  # bitwise: the cache holds what the live reference computes on these batches


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_dpo_loss_variants_fit(loss_type, in_tmp):
    rows = read_metrics(fit("dpo", "--trainer.max_steps=2", f"--model.init_args.loss_type={loss_type}"))
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sequence_sum", "sum"])
def test_sft_reductions_over_two_ranks_give_one_process_gradient(reduction, tiny_spec):
    """Two DDP ranks, simulated (each rank's training_step with its rescaling, the gradients averaged as DDP does),
    give the gradient of one process on the whole batch, also when the ranks hold 3 and 1 sequences."""
    from types import SimpleNamespace

    from dynlab.data.tokenize import collate_sequences
    from dynlab.modules import SFTModule

    module = SFTModule(policy=tiny_spec, reduction=reduction)
    module.log = lambda *args, **kwargs: None
    gen = torch.Generator().manual_seed(0)
    vocab = module.policy.config.vocab_size
    rows = [(torch.randint(vocab, (p,), generator=gen).tolist(), torch.randint(vocab, (r,), generator=gen).tolist())
            for p, r in ((3, 4), (5, 1), (2, 6), (4, 3))]

    def grads(part: list, world: int, reduce) -> list[Tensor]:
        module._trainer = SimpleNamespace(world_size=world, strategy=SimpleNamespace(reduce=reduce))
        module.policy.zero_grad()
        batch = collate_sequences([p for p, _ in part], [r for _, r in part], pad_token_id=0)
        module.training_step(batch, 0).backward()
        return [q.grad.clone() for q in module.policy.parameters()]

    one = grads(rows, 1, None)
    shards = (rows[:3], rows[3:])
    local: list[Tensor] = []  # what each rank hands to strategy.reduce: the sum over ranks is the reduce's answer
    for shard in shards:
        grads(shard, 2, lambda t, reduce_op: local.append(t.clone()) or t)
    total = sum(local) if local else None
    per_rank = [grads(shard, 2, lambda t, reduce_op: total.clone()) for shard in shards]
    ddp = torch.cat([(a + b).flatten() / 2 for a, b in zip(*per_rank)])
    assert torch.linalg.vector_norm(ddp - torch.cat([g.flatten() for g in one])) < 1e-5 * torch.linalg.vector_norm(ddp)


@pytest.mark.parametrize("a_norm", ["token_mean", "paper"])
def test_probe_a_norm_flag_gives_the_papers_a_o(a_norm, tiny_spec):
    """``a_norm: paper`` makes the probe metric the original code's A_o, here against a float64 reference from one
    plain forward of prompt + response; the default stays the mean of the per-token norms."""
    from types import SimpleNamespace

    from dynlab.data.tokenize import collate_probes
    from dynlab.modules import SFTModule

    module = SFTModule(policy=tiny_spec, a_norm=a_norm).eval()
    with torch.no_grad():  # peakier predictions than a random init's near-uniform ones, so the definitions differ
        module.policy.get_output_embeddings().weight.mul_(4.0)
    gen = torch.Generator().manual_seed(1)
    vocab = module.policy.config.vocab_size
    prompt = torch.randint(vocab, (7,), generator=gen)
    responses = {name: torch.randint(vocab, (n,), generator=gen) for name, n in (("chosen", 9), ("rejected", 4))}
    rows = [{"index": 0, "prompt_ids": prompt.tolist(), "responses": {k: v.tolist() for k, v in responses.items()}}]
    module.init_probe_state(SimpleNamespace(probe_types={"test": list(responses)}, probe_examples={"test": rows}))
    got = module.probe_step("test", collate_probes(rows))
    for name, ids in responses.items():
        with torch.no_grad():
            logits = module.policy(input_ids=torch.cat([prompt, ids])[None]).logits[0, len(prompt) - 1: -1]
        norms = torch.linalg.vector_norm(torch.softmax(logits.double(), -1), dim=-1)  # (R,) ||pi_m||
        want = (vocab * norms.mean() ** 2 + vocab - 2).sqrt() if a_norm == "paper" else \
            (vocab - 2 + vocab * norms**2).sqrt().mean()
        assert got[name]["a_norm"].item() == pytest.approx(want.item(), rel=1e-6), name
        other = (vocab - 2 + vocab * norms**2).sqrt().mean() if a_norm == "paper" else \
            (vocab * norms.mean() ** 2 + vocab - 2).sqrt()
        assert abs(other / want - 1) > 1e-4  # the two definitions are apart by more than the tolerance


def test_paper_configs_train_the_original_objective_and_warm_up(capsys):
    import yaml

    def init_args(stage: str) -> dict:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(CONFIGS / "paper" / f"{stage}.yaml"), "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]

    for stage in ("sft", "extend_sft", "dpo"):
        args = init_args(stage)
        if stage == "dpo":  # the original preference_loss: sigmoid, no label smoothing
            assert (args["loss_type"], args["beta"], args["label_smoothing"]) == ("sigmoid", 0.1, 0.0)
        else:
            assert args["reduction"] == "sequence_sum", stage
        # the original warm-up: LambdaLR(min(1, (step + 1) / (150 + 1))), stepped once per optimizer step
        sched = args["scheduler"]["init_args"]
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        linear = torch.optim.lr_scheduler.LinearLR(opt, **sched)
        for step in range(300):
            assert opt.param_groups[0]["lr"] == pytest.approx(min(1.0, (step + 1) / 151), rel=1e-6), (stage, step)
            opt.step()
            linear.step()


def test_validate_and_test_subcommands_score_probes(in_tmp, capsys):
    run = fit("sft", "--trainer.max_steps=1")
    for sub in ("validate", "test"):
        main([sub, "--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
              f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
        out = capsys.readouterr().out
        assert "probe/test/logp/chosen" in out and "probe/train/logp/chosen" in out


def test_reference_is_frozen_and_dropout_free(tiny_spec):
    from dynlab.modules import DPOModule

    module = DPOModule(policy=tiny_spec)
    assert not any(p.requires_grad for p in module.reference.parameters())
    assert not module.reference.training
    assert all(not n.startswith("_reference") for n, _ in module.named_parameters())
    with torch.no_grad():
        for p, q in zip(module.policy.parameters(), module.reference.parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


def test_fit_names_its_run_directory_first_shows_probe_progress_and_writes_its_timing(in_tmp, capsys, monkeypatch):
    import json

    from dynlab.modules import base

    monkeypatch.setattr(base, "PROBE_PROGRESS_AFTER_S", 0.0)  # every evaluation counts as a long one
    run = fit("sft", "--data.init_args.probe_batch_size=2")  # 2 batches per split (probe_size 4)
    out, err = capsys.readouterr()
    said = [line for line in out.splitlines() if line.startswith("dynlab: run directory: ")]
    assert said[0] == f"dynlab: run directory: {run}  (starting)"  # printed before training, then again at the end
    assert said[1].startswith(f"dynlab: run directory: {run}  (metrics.csv")
    progress = [line for line in err.split("\n") if "dynlab: probe evaluation" in line]
    # steps 0, 3 and 6, two splits of 2 batches each: every batch passes another tenth, one whole line each
    assert [line.split(" batches")[0] for line in progress] == [
        f"dynlab: probe evaluation at step {step}: probe_{split} {done}/2" for step in (0, 3, 6)
        for split in ("train", "test") for done in (1, 2)]
    assert all(line.startswith("dynlab: ") and line.endswith(" s elapsed") for line in progress)
    timing = json.loads((run / "timing.json").read_text())
    assert list(timing) == ["train_s", "probe_eval_s", "export_s", "total_s"]
    assert all(value > 0 for value in timing.values())
    assert timing["train_s"] + timing["probe_eval_s"] + timing["export_s"] == pytest.approx(timing["total_s"], abs=0.01)


def test_probe_progress_is_one_line_per_tenth_only_when_slow_and_only_on_rank_0(capsys, monkeypatch):
    from dynlab.modules.base import ProbeProgress

    def lines(progress: ProbeProgress, total: int = 25) -> list[str]:
        progress.begin("test", total)
        for done in range(1, total + 1):
            progress.update(done)
        return capsys.readouterr().err.splitlines()

    shown = lines(ProbeProgress(step=7, enabled=True, after_s=0.0))
    assert [line.split(": probe_test ")[1].split(" ")[0] for line in shown] == [
        "1/25", "3/25", "5/25", "8/25", "10/25", "13/25", "15/25", "18/25", "20/25", "23/25", "25/25"]
    assert shown[0].startswith("dynlab: probe evaluation at step 7: probe_test 1/25 batches, ")
    assert lines(ProbeProgress(step=7, enabled=False, after_s=0.0)) == []  # rank > 0
    assert lines(ProbeProgress(step=7, enabled=True, after_s=3600.0)) == []  # a quick evaluation says nothing
    assert len(lines(ProbeProgress(step=7, enabled=True, after_s=0.0), total=1000)) == 11  # not one per batch
