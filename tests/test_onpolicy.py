"""SPIN-style on-policy negatives in DPOModule (configs/spin.yaml) on the tiny model: a fit through the CLI keeps every
sample and logs their statistics next to the usual probes; a step's samples depend only on (seed, step, rank), so a
stopped and resumed run is the uninterrupted one bit for bit; the rebuilt batch; reference_update_every; bad settings
refused naming the field."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dynlab.cli import DynlabCLI, main
from dynlab.data.tokenize import DPOCollator
from dynlab.errors import InputError
from dynlab.losses.logps import IGNORE_INDEX
from dynlab.models.adapter import AdapterSpec
from dynlab.models.generate import generate_token_ids
from dynlab.models.load import ModelSpec, tiny_model
from dynlab.models.sampling import SamplingSpec, prompt_ids_of, sample_seed
from dynlab.modules import DPOModule
from tests.conftest import CONFIGS
from tests.test_modules import fit, probe_rows, read_metrics
from tests.test_resume import assert_same_run, checkpoint_every

SPIN = ["fit", "--config", str(CONFIGS / "spin.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
SHORT = "--model.init_args.sampling.max_new_tokens=6"
EVERY_STEP = ('--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
              '"init_args": {"every_n_train_steps": 1, "save_top_k": -1}}]')


def read_samples(run: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((run / "samples").glob("*.jsonl"))}


def test_spin_fit_keeps_every_sample_and_logs_probes_as_dpo(in_tmp):
    run = fit("spin", "--trainer.max_steps=3", SHORT)
    rows = read_metrics(run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(2))  # policy = reference at step 0, whatever the negatives
    probes = probe_rows(rows)
    assert sorted(probes) == [0, 3]
    assert probes[0]["probe/train/reward_margin"] == 0.0 and math.isfinite(probes[3]["probe/test/logp/rejected"])
    samples = read_samples(run)
    assert list(samples) == [f"step_{s:08d}_rank0.jsonl" for s in range(3)]
    tokenizer = DPOModule(policy=ModelSpec(name_or_path="tiny")).tokenizer
    eos = tokenizer.eos_token_id
    stats = {int(r["step"]): r for r in rows if "train/sample/length" in r}
    assert sorted(stats) == [0, 1, 2]
    for step, name in enumerate(samples):
        kept = samples[name]
        assert len(kept) == 4 and len({r["index"] for r in kept}) == 4  # one per pair of the batch of 4
        for r in kept:
            assert r["seed"] == sample_seed(0, step, 0) and 1 <= r["tokens"] == len(r["sample_ids"]) <= 6
            assert eos not in r["sample_ids"][:-1]  # cut after the first EOS
            assert r["sample"] == tokenizer.decode(r["sample_ids"], skip_special_tokens=True)
            assert r["prompt"].startswith("\n\nHuman:") and r["prompt"].endswith("Assistant:")
        logged = stats[step]
        assert logged["train/sample/length"] == pytest.approx(sum(r["tokens"] for r in kept) / 4)
        assert logged["train/sample/eos_fraction"] == pytest.approx(
            sum(r["sample_ids"][-1] == eos for r in kept) / 4)
        assert 0 <= logged["train/sample/distinct_2"] <= 1 and 0 <= logged["train/sample/repeated_4gram"] <= 1
    assert samples[list(samples)[0]] != samples[list(samples)[1]]


def test_a_stopped_and_resumed_spin_run_samples_and_trains_as_an_uninterrupted_one(in_tmp, monkeypatch):
    # reference_update_every 2 and a stop at step 3: the resumed run needs the step-2 reference from the checkpoint
    args = [*SPIN, SHORT, "--trainer.max_steps=5", "--model.init_args.probe_every_n_steps=0",
            "--model.init_args.reference_update_every=2", checkpoint_every(3)]
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "whole")
    main(args)
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "stopped")
    main([*args, "--trainer.max_steps=3"])
    main([*args, "--ckpt_path=last"])
    whole, stopped = in_tmp / "runs" / "spin" / "whole", in_tmp / "runs" / "spin" / "stopped"
    assert_same_run(stopped, whole)  # final weights and every step's loss, bitwise
    a, b = read_samples(stopped), read_samples(whole)
    assert list(a) == [f"step_{s:08d}_rank0.jsonl" for s in range(5)] and a == b
    for name in a:  # byte for byte, as written
        assert (stopped / "samples" / name).read_bytes() == (whole / "samples" / name).read_bytes()
    # the samples are the seed's: another seed samples otherwise
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "seed1")
    main([*args, "--trainer.max_steps=1", "--model.init_args.sampling.seed=1"])
    other = read_samples(in_tmp / "runs" / "spin" / "seed1")
    assert [r["sample_ids"] for r in other["step_00000000_rank0.jsonl"]] != \
        [r["sample_ids"] for r in a["step_00000000_rank0.jsonl"]]


def pairs(module: DPOModule) -> tuple[dict, list[tuple[list[int], list[int], list[int]]]]:
    gen = torch.Generator().manual_seed(0)
    vocab = module.policy.config.vocab_size

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    rows = [(ids(p), ids(c), ids(r)) for p, c, r in ((4, 5, 2), (7, 1, 9), (3, 4, 4))]
    examples = [{"index": 10 + i, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                for i, (p, c, r) in enumerate(rows)]
    return DPOCollator(module.tokenizer.pad_token_id)(examples), rows


@pytest.mark.parametrize("max_new_tokens", [3, 20])  # rejected rows shorter, and longer, than the dataset's
def test_the_rebuilt_batch_is_chosen_as_is_and_prompt_plus_sample(max_new_tokens, tiny_spec, tmp_path):
    module = DPOModule(policy=tiny_spec, negatives="policy", sampling=SamplingSpec(max_new_tokens=max_new_tokens))
    batch, rows = pairs(module)
    assert prompt_ids_of(batch) == [p for p, _, _ in rows]
    rng = torch.get_rng_state()
    new, samples, seed = module.sample_negatives(batch)
    assert torch.equal(torch.get_rng_state(), rng) and module.policy.training  # global RNG untouched, train mode
    assert seed == sample_seed(0, 0, 0)
    assert samples == generate_token_ids(module.policy, module.tokenizer, [p for p, _, _ in rows],
                                         max_new_tokens=max_new_tokens, seed=seed, batch_size=3)
    pad, (b, width) = module.tokenizer.pad_token_id, batch["input_ids"].shape
    assert new["input_ids"].shape[1] == max(width, *(len(p) + len(s) for (p, _, _), s in zip(rows, samples)))
    for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        assert torch.equal(new[key][: b // 2, :width], batch[key][: b // 2])  # the chosen rows, as they were
        assert (new[key][: b // 2, width:] == fill).all()
    assert torch.equal(new["index"], batch["index"])
    for k, ((prompt, _, _), sample) in enumerate(zip(rows, samples)):
        row, n = b // 2 + k, len(prompt) + len(sample)
        assert 1 <= len(sample) <= max_new_tokens
        assert new["input_ids"][row, :n].tolist() == prompt + sample and (new["input_ids"][row, n:] == pad).all()
        assert new["labels"][row].tolist() == [IGNORE_INDEX] * len(prompt) + sample + [IGNORE_INDEX] * (
            new["labels"].shape[1] - n)
        assert new["attention_mask"][row].tolist() == [1] * n + [0] * (new["labels"].shape[1] - n)
    module.log = module.log_dict = lambda *args, **kwargs: None
    module._run_dir = tmp_path
    loss = module.training_step(batch, 0)  # policy = reference: the DPO logit is 0 on the rebuilt batch
    assert loss.item() == pytest.approx(math.log(2))
    kept = [json.loads(line) for line in (tmp_path / "samples" / "step_00000000_rank0.jsonl").read_text().splitlines()]
    assert [r["index"] for r in kept] == [10, 11, 12] and [r["sample_ids"] for r in kept] == samples


def test_generated_ids_are_cut_after_the_first_eos_without_padding(tiny_spec):
    """With a token the model samples declared the EOS, each response ends right after its first one, as the same
    seed's response without that EOS began; responses that never sample it run to max_new_tokens."""
    module = DPOModule(policy=tiny_spec)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    free = generate_token_ids(module.policy, module.tokenizer, prompts, max_new_tokens=12, seed=3)
    stop = free[0][2]
    tokenizer = SimpleNamespace(eos_token_id=stop, pad_token_id=module.tokenizer.pad_token_id)
    cut = generate_token_ids(module.policy, tokenizer, prompts, max_new_tokens=12, seed=3)
    assert cut[0] == free[0][: free[0].index(stop) + 1]
    for ids in cut:
        assert stop not in ids[:-1] and (ids[-1] == stop or len(ids) == 12)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reference_update_every_makes_the_reference_the_policy(in_tmp, monkeypatch):
    initial = state(tiny_model(ModelSpec(name_or_path="tiny")))
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "every2")
    cli = DynlabCLI(args=[*SPIN, SHORT, "--trainer.max_steps=3", "--model.init_args.reference_update_every=2",
                          "--model.init_args.probe_every_n_steps=0", EVERY_STEP])
    ckpts = {int(p.stem.split("step=")[1]): torch.load(p, weights_only=False)
             for p in (in_tmp / "runs" / "spin" / "every2" / "checkpoints").glob("*step=*.ckpt")}
    assert sorted(ckpts) == [1, 2, 3]
    policy = {s: {k.removeprefix("policy."): v for k, v in c["state_dict"].items() if k.startswith("policy.")}
              for s, c in ckpts.items()}
    assert "dynlab_reference_state" not in ckpts[1]  # not yet updated: the initial weights, rebuilt on load
    assert equal(ckpts[2]["dynlab_reference_state"], policy[2]) and not equal(policy[2], initial)
    assert equal(ckpts[3]["dynlab_reference_state"], policy[2]) and not equal(policy[3], policy[2])
    assert ckpts[3]["dynlab_reference_updates"] == 1
    assert equal(state(cli.model.reference), policy[2])
    assert not any(p.requires_grad for p in cli.model.reference.parameters()) and not cli.model.reference.training
    updates = [r["train/reference_updates"] for r in read_metrics(in_tmp / "runs" / "spin" / "every2")
               if "train/reference_updates" in r]
    assert updates == [0.0, 0.0, 1.0]  # logged at steps 0, 1, 2: the updates before each step

    monkeypatch.setenv("DYNLAB_RUN_VERSION", "never")
    cli = DynlabCLI(args=[*SPIN, SHORT, "--trainer.max_steps=2", "--model.init_args.probe_every_n_steps=0"])
    assert equal(state(cli.model.reference), initial) and not equal(state(cli.model.policy), initial)
    assert "dynlab_reference_state" not in torch.load(in_tmp / "runs" / "spin" / "never" / "checkpoints" / "last.ckpt",
                                                      weights_only=False)


@pytest.mark.parametrize(("kwargs", "field", "says"), [
    ({"sampling": SamplingSpec(temperature=0.0)}, "model.sampling.temperature", "> 0"),
    ({"sampling": SamplingSpec(top_p=1.5)}, "model.sampling.top_p", "(0, 1]"),
    ({"sampling": SamplingSpec(top_p=0.0)}, "model.sampling.top_p", "(0, 1]"),
    ({"sampling": SamplingSpec(max_new_tokens=0)}, "model.sampling.max_new_tokens", "at least 1"),
    ({"reference_update_every": -1}, "model.reference_update_every", ">= 0"),
    ({"negatives": "policy", "precompute_ref_logps": True}, "model.precompute_ref_logps", "no cached reference"),
    ({"reference_update_every": 2, "precompute_ref_logps": True}, "model.precompute_ref_logps", "cannot be cached"),
    ({"reference_update_every": 2, "loss_type": "simpo", "beta": 2.0}, "model.reference_update_every",
     "no reference"),
    ({"reference_update_every": 2, "adapter": AdapterSpec(r=2)}, "model.reference_update_every",
     "not supported with an adapter"),
    ({"negatives": "sampled"}, "model.negatives", "'dataset' or 'policy'"),
])
def test_bad_settings_are_refused_naming_the_field(kwargs, field, says, tiny_spec):
    with pytest.raises(InputError, match=f"field '{field}'") as err:
        DPOModule(policy=tiny_spec, **kwargs)
    assert says in str(err.value)


@pytest.mark.parametrize(("extra", "field"), [
    ("--model.init_args.sampling.temperature=0", "model.sampling.temperature"),
    ("--model.init_args.precompute_ref_logps=true", "model.precompute_ref_logps"),
    ("--trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
])
def test_bad_settings_through_the_cli_fail_in_one_line_before_the_run(extra, field, in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*SPIN, extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"field '{field}'" in err[0], err
    assert not Path("runs").exists()


def test_policy_negatives_under_fsdp_are_refused(tiny_spec):
    fsdp = SimpleNamespace(strategy=type("FSDPStrategy", (), {})(), accumulate_grad_batches=1)
    for kwargs in ({"negatives": "policy"}, {"reference_update_every": 2}):
        with pytest.raises(InputError, match="under FSDP is not supported"):
            DPOModule(policy=tiny_spec, probe_every_n_steps=0, **kwargs).check_strategy(fsdp)
