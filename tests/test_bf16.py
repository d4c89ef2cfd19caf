"""Probe metrics under bf16 (Lightning's bf16-mixed and bf16-true precision plugins, on CPU): computed from a float32
log-softmax, within a stated tolerance of float32, and finite on peaky and flat distributions. bf16 matmuls are
several times slower than float32 on this CPU: the model and rows stay tiny."""

from __future__ import annotations

import csv
import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision

from dynlab.cli import main
from dynlab.data.tokenize import collate_probes
from dynlab.metrics.functional import SEQUENCE_METRICS, token_stats
from dynlab.modules import SFTModule
from tests.conftest import CONFIGS

# measured on the tiny model (3 rows of 5-10 response tokens): at most 7.5e-4 relative (max_prob and
# except_argmax_logp) and 4.6e-3 absolute on summed log-probs of about -40, for bf16-mixed and bf16-true alike;
# set with a margin of 6x
RTOL, ATOL = 5e-3, 1e-4


def probe_rows(vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    return [{"index": i, "prompt_ids": torch.randint(2, vocab, (6 + i,), generator=gen).tolist(),
             "responses": {t: torch.randint(2, vocab, (5 + 2 * i + j,), generator=gen).tolist()
                           for j, t in enumerate(("chosen", "rejected"))}} for i in range(3)]


def score(tiny_spec, precision: str, logit_scale: float | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """probe_step of the tiny model under ``precision``'s Lightning plugin (its module conversion and forward
    context, as a Trainer applies them); ``logit_scale`` multiplies the (tied) output embedding."""
    module = SFTModule(policy=tiny_spec).eval()
    if logit_scale is not None:
        with torch.no_grad():
            module.policy.get_output_embeddings().weight.mul_(logit_scale)
    plugin = {"32-true": None, "bf16-mixed": MixedPrecision("bf16-mixed", "cpu"),
              "bf16-true": HalfPrecision("bf16-true")}[precision]
    if plugin is not None:
        module = plugin.convert_module(module)
    rows = probe_rows(module.policy.config.vocab_size)
    module.init_probe_state(SimpleNamespace(probe_types={"test": ["chosen", "rejected"]},
                                            probe_examples={"test": rows}))
    with plugin.forward_context() if plugin is not None else nullcontext():
        return module.probe_step("test", collate_probes(rows))


@pytest.fixture(scope="module")
def fp32_metrics():
    from dynlab.models.load import ModelSpec

    return score(ModelSpec(name_or_path="tiny"), "32-true")


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_probe_metrics_match_float32_within_tolerance(precision, tiny_spec, fp32_metrics):
    got = score(tiny_spec, precision)
    for name, ref in fp32_metrics.items():
        for metric in SEQUENCE_METRICS:
            assert got[name][metric].dtype == torch.float32, metric  # from the float32 log-softmax
            assert torch.allclose(got[name][metric], ref[metric], rtol=RTOL, atol=ATOL), (name, metric)
        assert not torch.equal(got[name]["logp"], ref["logp"])  # bf16 really ran


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("logit_scale", [100.0, 0.0], ids=["peaky", "flat"])
def test_no_probe_metric_is_nan_or_inf_on_peaky_or_flat_distributions(precision, logit_scale, tiny_spec):
    got = score(tiny_spec, precision, logit_scale)
    for name, values in got.items():
        for metric, v in values.items():
            assert torch.isfinite(v.float()).all(), (precision, name, metric)
    max_prob = got["chosen"]["max_prob"]
    if logit_scale == 0.0:  # zero logits: uniform over V
        vocab = 512
        assert torch.allclose(max_prob, torch.full_like(max_prob, 1 / vocab), rtol=1e-3)
    else:
        assert (max_prob > 0.99).all()


@pytest.mark.parametrize("kind", ["peaky", "flat"])
def test_token_stats_upcast_bf16_logits(kind):
    """token_stats on bf16 logits: float32 results, finite, equal to the same logits given in float32."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 512, generator=gen) * 100 if kind == "peaky" else torch.zeros(6, 512)).bfloat16()
    targets = torch.randint(512, (6,), generator=gen)
    got, want = token_stats(logits, targets), token_stats(logits.float(), targets)
    for metric in SEQUENCE_METRICS:
        assert got[metric].dtype == torch.float32 and torch.isfinite(got[metric]).all(), metric
        assert torch.equal(got[metric], want[metric]), metric


def test_fit_under_bf16_mixed_logs_finite_probe_metrics(in_tmp):
    """``dynlab fit --trainer.precision=bf16-mixed`` end to end on the tiny SFT overlay (1 step)."""
    main(["fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
          "--trainer.precision=bf16-mixed", "--trainer.max_steps=1"])
    run = next(Path("runs", "sft").glob("version_*"))
    with open(run / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    probes = [r for r in rows if "probe/train/logp/chosen" in r]
    assert [int(r["step"]) for r in probes] == [0, 1]
    for r in probes:
        for key, value in r.items():
            if key.startswith("probe/") and "/dlogp/" not in key:
                assert math.isfinite(value), key
    assert any(math.isfinite(r.get("train/loss", math.nan)) for r in rows)


def test_dpo_under_bf16_true_casts_the_reference_with_the_policy(in_tmp):
    """bf16-true converts the policy; the DPO reference (outside the module tree) follows it at fit start, so at step 0
    policy and reference give the same log-probs and the first loss is exactly log 2."""
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
          "--trainer.precision=bf16-true", "--trainer.max_steps=1", "--model.init_args.probe_every_n_steps=0"])
    run = next(Path("runs", "dpo").glob("version_*"))
    with open(run / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert losses and losses[0] == pytest.approx(math.log(2), abs=1e-6)
