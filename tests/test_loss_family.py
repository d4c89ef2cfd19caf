"""The whole preference-loss family through DPOModule: every ``loss_type`` fits through the CLI on the tiny overlay;
the module's training loss is ``dpo_loss`` on independently computed log-probs and response lengths (chosen rows
first); SimPO builds, runs and checkpoints no reference; bad parameters are one error naming the field."""

from __future__ import annotations

import math

import pytest
import torch

from dynlab.data.tokenize import DPOCollator
from dynlab.dynamics.influence import pack, sequence_logps
from dynlab.errors import InputError
from dynlab.losses.dpo import LOSS_TYPES, dpo_loss
from dynlab.modules import DPOModule
from tests.test_modules import fit, read_metrics

EXTRA = {"simpo": ("--model.init_args.beta=2.0", "--model.init_args.gamma=0.5")}


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "sigmoid"])
def test_every_loss_type_fits(loss_type, in_tmp):
    run = fit("dpo", "--trainer.max_steps=2", f"--model.init_args.loss_type={loss_type}", *EXTRA.get(loss_type, ()))
    rows = read_metrics(run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any("probe/train/logp/chosen" in r for r in rows)  # probes and every metric unchanged
    assert (run / "export" / "config.json").is_file()


def pairs_batch(module: DPOModule) -> tuple[dict, list[tuple[list[int], list[int], list[int]]]]:
    gen = torch.Generator().manual_seed(0)
    vocab = module.policy.config.vocab_size
    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    rows = [(ids(p), ids(c), ids(r)) for p, c, r in ((4, 5, 2), (3, 1, 6), (6, 4, 4))]
    examples = [{"index": i, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for i, (p, c, r) in enumerate(rows)]
    return DPOCollator(module.tokenizer.pad_token_id)(examples), rows


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_training_loss_is_dpo_loss_on_the_batch(loss_type, tiny_spec):
    module = DPOModule(policy=tiny_spec, loss_type=loss_type, beta=0.5, nll_weight=2.0, delta=0.5, gamma=0.3)
    module.log = module.log_dict = lambda *args, **kwargs: None
    torch.manual_seed(0)
    with torch.no_grad():  # policy != reference, so every term of every loss is live
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch, rows = pairs_batch(module)
    loss = module.training_step(batch, 0)
    chosen = pack([(p, c) for p, c, _ in rows])
    rejected = pack([(p, r) for p, _, r in rows])
    with torch.no_grad():
        pc, pr = sequence_logps(module.policy, chosen), sequence_logps(module.policy, rejected)
        if loss_type == "simpo":
            rc = rr = None
        else:
            rc, rr = sequence_logps(module.reference, chosen), sequence_logps(module.reference, rejected)
    expected, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, nll_weight=2.0, delta=0.5, gamma=0.3,
                              chosen_lengths=torch.tensor([len(c) for _, c, _ in rows]),
                              rejected_lengths=torch.tensor([len(r) for _, _, r in rows]))
    torch.testing.assert_close(loss.detach(), expected.mean(), rtol=1e-5, atol=1e-6)


def test_simpo_has_no_reference(tiny_spec, monkeypatch):
    module = DPOModule(policy=tiny_spec, loss_type="simpo", beta=2.0)
    assert module._reference == [] and module.reference_free
    policy_params = sum(p.numel() for p in module.policy.parameters())
    assert sum(p.numel() for p in module.parameters()) == policy_params  # one model's weights in the module

    def no_reference(*args, **kwargs):
        raise AssertionError("simpo ran a reference forward")

    monkeypatch.setattr(module, "reference_sequence_logps", no_reference)
    module.log = module.log_dict = lambda *args, **kwargs: None
    batch, _ = pairs_batch(module)
    assert torch.isfinite(module.training_step(batch, 0))
    with pytest.raises(InputError, match="precompute"):
        DPOModule(policy=tiny_spec, loss_type="simpo", precompute_ref_logps=True)


@pytest.mark.parametrize(("argument", "value"), [("beta", 0.0), ("nll_weight", -1.0), ("gamma", -0.1),
                                                 ("delta", -1.0), ("dpop_lambda", float("nan"))])
def test_bad_loss_parameters_name_the_field(argument, value, tiny_spec):
    with pytest.raises(InputError, match=f"model.{argument}"):
        DPOModule(policy=tiny_spec, loss_type="rpo", **{argument: value})


def test_unknown_loss_type_lists_the_valid_ones(in_tmp, capsys):
    with pytest.raises(SystemExit):
        fit("dpo", "--model.init_args.loss_type=kto")
    err = capsys.readouterr().err
    assert all(t in err for t in LOSS_TYPES)
