"""Gradient entanglement (Yuan et al. 2024) on the tiny model: <g+, g->, ||g+||^2, ||g-||^2 and their cosine against
one plain forward/backward per response, on every trainable parameter, a regex subset and a LoRA adapter; gradient
similarity against the same brute force; the probe evaluation's per-pair columns and logged means in a fit;
bad input."""

from __future__ import annotations

import copy
import csv
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from dynlab.cli import main
from dynlab.data.datamodule import ProbeDataModule
from dynlab.dynamics.influence import gradient_entanglement, gradient_similarity, response_gradient_gram
from dynlab.errors import InputError
from dynlab.metrics.displacement import ENTANGLEMENT_STATS, EntanglementMetric
from dynlab.models.adapter import AdapterSpec
from dynlab.models.load import load_model
from dynlab.modules import DPOModule
from tests.conftest import CONFIGS

TINY_DATA = dict(num_train=8, num_heldout=4, probe_size=4, probe_batch_size=3, max_length=128, max_prompt_length=64)
# (prompt, y+, y-): different lengths, a shared prefix, and y- = y+ (cosine 1)
TRIPLES = [([2, 5, 6], [10, 11, 12], [40, 41, 42, 43]),
           ([7, 8, 9, 10, 11], [20, 21], [20, 22, 23]),
           ([3], [30, 31, 32, 33, 34], [30, 31, 32, 33, 34])]
LAYER_1 = r"layers\.1\."


# ---- references -----------------------------------------------------------------------------------------------------
def brute_gradient(model, prompt: list[int], response: list[int], pattern: str | None = None) -> torch.Tensor:
    """∇θ sum_k log π(y_k | x, y_<k) by one plain forward (model(input_ids).logits, log_softmax, gather) and one
    backward, flattened over the trainable parameters whose name matches ``pattern`` (all if None), float64."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and (pattern is None or re.search(pattern, n))]
    params = dict(model.named_parameters())
    with torch.enable_grad():
        logits = model(input_ids=torch.tensor(prompt + response)[None]).logits[0].float()  # (T, V)
        logps = logits[len(prompt) - 1 : -1].log_softmax(-1)  # the positions that predict the response's tokens
        logp = logps.gather(-1, torch.tensor(response)[:, None]).sum()
        grads = torch.autograd.grad(logp, [params[n] for n in names], allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(params[n])).reshape(-1).double()
                      for n, g in zip(names, grads)])


def brute_entanglement(model, prompt: list[int], chosen: list[int], rejected: list[int],
                       pattern: str | None = None) -> dict[str, float]:
    gc, gr = brute_gradient(model, prompt, chosen, pattern), brute_gradient(model, prompt, rejected, pattern)
    dot, sc, sr = (gc @ gr).item(), (gc @ gc).item(), (gr @ gr).item()
    return {"dot": dot, "sq_chosen": sc, "sq_rejected": sr, "cosine": dot / math.sqrt(sc * sr)}


def assert_entanglement(got: dict, want: dict[str, float], rel: float = 1e-5) -> None:
    for m in ENTANGLEMENT_STATS:
        value = float(got[m])
        assert abs(value - want[m]) <= rel * abs(want[m]), (m, value, want[m])


@pytest.fixture(scope="module")
def tiny_model():
    from dynlab.models.load import ModelSpec

    return load_model(ModelSpec(name_or_path="tiny")).eval()


# ---- the pure functions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [None, LAYER_1, r"embed_tokens"])
def test_gradient_entanglement_equals_a_plain_backward_per_response(tiny_model, pattern):
    for prompt, chosen, rejected in TRIPLES:
        got = gradient_entanglement(tiny_model, prompt, chosen, rejected, params=pattern)
        assert all(v.dtype == torch.float64 and v.dim() == 0 for v in got.values())
        assert_entanglement(got, brute_entanglement(tiny_model, prompt, chosen, rejected, pattern))
    assert got["cosine"].item() == pytest.approx(1.0, abs=1e-9)  # the last pair's y- is its y+
    assert all(p.grad is None for p in tiny_model.parameters())  # no parameter's .grad was touched


def test_a_subset_is_its_own_gradient_and_entanglement_runs_under_no_grad(tiny_model):
    prompt, chosen, rejected = TRIPLES[0]
    full = gradient_entanglement(tiny_model, prompt, chosen, rejected)
    with torch.no_grad():
        subset = gradient_entanglement(tiny_model, prompt, chosen, rejected, params=LAYER_1)
    with torch.inference_mode():  # Lightning's validate/test loops
        again = gradient_entanglement(tiny_model, prompt, chosen, rejected, params=LAYER_1)
    assert subset["sq_chosen"] < full["sq_chosen"]  # a strict subset of the parameters
    torch.testing.assert_close(again["dot"], subset["dot"])
    with pytest.raises(ValueError, match="no trainable parameter matches"):
        gradient_entanglement(tiny_model, prompt, chosen, rejected, params="no_such_parameter")


def test_gradient_similarity_is_the_brute_force_cosine_and_the_gram_its_inner_products(tiny_model):
    prompt = [2, 5, 6]
    responses = {"a": [10, 11, 12], "same_as_a": [10, 11, 12], "b": [40, 41, 42, 43], "c": [7, 7, 7]}
    for pattern in (None, LAYER_1):
        grads = torch.stack([brute_gradient(tiny_model, prompt, r, pattern) for r in responses.values()])  # (R, P)
        gram = grads @ grads.T
        names, got_gram = response_gradient_gram(tiny_model, prompt, responses, params=pattern)
        assert names == list(responses) and got_gram.dtype == torch.float64
        torch.testing.assert_close(got_gram, gram, rtol=1e-5, atol=1e-5 * gram.diagonal().max().item())
        norms = gram.diagonal().sqrt()
        names, cosine = gradient_similarity(tiny_model, prompt, responses, params=pattern)
        assert names == list(responses) and cosine.dtype == torch.float32
        torch.testing.assert_close(cosine, (gram / norms[:, None] / norms[None, :]).float(), rtol=1e-5, atol=1e-5)


def test_entanglement_metric_is_the_mean_over_batches():
    metric = EntanglementMetric()
    values = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    metric.update({m: values[i, :2] for i, m in enumerate(ENTANGLEMENT_STATS)})
    metric.update({m: values[i, 2:] for i, m in enumerate(ENTANGLEMENT_STATS)})
    out = metric.compute()
    assert list(out) == [f"entanglement/{m}" for m in ENTANGLEMENT_STATS]
    for i, m in enumerate(ENTANGLEMENT_STATS):
        assert out[f"entanglement/{m}"].item() == pytest.approx(values[i].mean().item())
    with pytest.raises(ValueError, match="expected the statistics"):
        metric.update({"dot": torch.ones(2)})


# ---- in the probe evaluation ----------------------------------------------------------------------------------------
def read_metrics(run: Path) -> dict[int, dict[str, float]]:
    with open(run / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return {int(r["step"]): r for r in rows if "probe/train/entanglement/dot" in r}


def test_a_fit_stores_the_first_pairs_entanglement_and_logs_its_means(tmp_path, tiny_spec):
    from dynlab.tracking.trajectory import read_trajectory

    module = DPOModule(policy=tiny_spec, probe_every_n_steps=2, probe_entanglement_pairs=2)
    initial = copy.deepcopy(module.policy).eval()
    dm = ProbeDataModule(**TINY_DATA)
    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"))
    trainer.fit(module, datamodule=dm)
    run = Path(trainer.log_dir)
    frame, logged = read_trajectory(run), read_metrics(run)
    assert sorted(logged) == [0, 2]
    columns = [f"grad_{m}" for m in ENTANGLEMENT_STATS]
    assert frame.loc[frame["type"] != "chosen", columns].isna().all().all()  # per pair: on the chosen rows
    for step, model in ((0, initial), (2, module.policy.eval())):
        for split in dm.probe_types:
            chosen = frame[(frame["step"] == step) & (frame["split"] == split) & (frame["type"] == "chosen")]
            chosen = chosen.set_index("row")
            assert chosen.loc[chosen.index >= 2, columns].isna().all().all() and len(chosen) > 2
            examples = {e["index"]: e for e in dm.probe_examples[split]}
            for row in (0, 1):
                e = examples[row]
                want = brute_entanglement(model, e["prompt_ids"], e["responses"]["chosen"], e["responses"]["rejected"])
                assert_entanglement({m: chosen.loc[row, f"grad_{m}"] for m in ENTANGLEMENT_STATS}, want)
            for m in ENTANGLEMENT_STATS:  # the logged mean is the mean of the stored pairs
                want = chosen.loc[[0, 1], f"grad_{m}"].mean()
                assert logged[step][f"probe/{split}/entanglement/{m}"] == pytest.approx(want, rel=1e-5)
    assert module.probe_entanglement_count == 2 * 2 * len(dm.probe_types) and module.probe_entanglement_seconds > 0


def test_with_an_adapter_the_gradients_are_the_adapters(tiny_spec):
    module = DPOModule(policy=tiny_spec, adapter=AdapterSpec(r=4, alpha=8), probe_entanglement_pairs=1,
                       probe_entanglement_params=r"lora_B")
    dm = ProbeDataModule(**TINY_DATA)
    dm.prepare(module.tokenizer, "dpo")
    module.init_probe_state(dm)
    module.policy.eval()
    batch = next(iter(dm.probe_dataloader("train")))
    with torch.inference_mode():  # as in Lightning's validation loop
        chosen = module.probe_step("train", batch)["chosen"]
    e = next(e for e in dm.probe_examples["train"] if e["index"] == 0)
    want = brute_entanglement(module.policy, e["prompt_ids"], e["responses"]["chosen"], e["responses"]["rejected"],
                              r"lora_B")
    first = chosen["row"].tolist().index(0)
    assert_entanglement({m: chosen[f"grad_{m}"][first] for m in ENTANGLEMENT_STATS}, want)
    assert torch.isnan(chosen["grad_dot"][[i for i, r in enumerate(chosen["row"].tolist()) if r != 0]]).all()
    assert all(p.grad is None for p in module.policy.parameters())


def test_off_by_default_no_columns_and_no_metric(tiny_spec):
    module = DPOModule(policy=tiny_spec)
    dm = ProbeDataModule(**TINY_DATA)
    dm.prepare(module.tokenizer, "dpo")
    module.init_probe_state(dm)
    chosen = module.probe_step("train", next(iter(dm.probe_dataloader("train"))))["chosen"]
    assert not any(k.startswith("grad_") for k in chosen)
    assert not any("entanglement" in k for k in module.compute_probe_metrics())


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"probe_entanglement_pairs": -1}, "model.probe_entanglement_pairs"),
    ({"probe_entanglement_pairs": 2, "probe_entanglement_params": "layers\\.(1"}, "model.probe_entanglement_params"),
    ({"probe_entanglement_pairs": 2, "probe_entanglement_params": "no_such_parameter"},
     "model.probe_entanglement_params"),
])
def test_bad_entanglement_arguments_name_the_field(tiny_spec, kwargs, field):
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        DPOModule(policy=tiny_spec, **kwargs)


def test_a_regex_on_the_frozen_base_of_an_adapter_is_refused(tiny_spec):
    with pytest.raises(InputError, match="matches no trainable parameter.*lora"):
        DPOModule(policy=tiny_spec, adapter=AdapterSpec(r=4, alpha=8), probe_entanglement_params=r"embed_tokens")


@pytest.mark.parametrize(("arg", "field"), [("--model.init_args.probe_entanglement_pairs=-2",
                                             "model.probe_entanglement_pairs"),
                                            ("--model.init_args.probe_entanglement_params=layers\\.(1",
                                             "model.probe_entanglement_params")])
def test_dynlab_fit_takes_the_arguments_and_refuses_bad_ones_before_writing(in_tmp, capsys, arg, field):
    configs = ["--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *configs, arg])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
    assert not Path("runs").exists()


@pytest.mark.slow
def test_two_ddp_ranks_give_the_entanglement_of_one_process(tmp_path):
    """Each rank computes the pairs of its shard (rows 0 and 2 on rank 0, 1 on rank 1); the synced means and the
    gathered per-pair columns equal one process's."""
    import pandas as pd

    from dynlab.tracking.trajectory import read_trajectory
    from tests.conftest import run_dir_of, run_dynlab

    runs = {}
    for name, extra in (("one", ("--trainer.devices=1", "--data.init_args.batch_size=4")),
                        ("two", ("--trainer.devices=2", "--trainer.strategy=ddp", "--data.init_args.batch_size=2"))):
        (tmp_path / name).mkdir()
        proc = run_dynlab("fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
                          "--trainer.accelerator=cpu", "--trainer.max_steps=3",
                          "--model.init_args.probe_entanglement_pairs=3", *extra, cwd=tmp_path / name, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = run_dir_of(proc, tmp_path / name)
    logged = {name: read_metrics(run) for name, run in runs.items()}
    assert sorted(logged["one"]) == sorted(logged["two"]) == [0, 3]
    for step in (0, 3):
        for key, value in logged["one"][step].items():
            if "/entanglement/" in key:
                assert logged["two"][step][key] == pytest.approx(value, rel=1e-4), key
    columns = ["step", "split", "type", "row", *(f"grad_{m}" for m in ENTANGLEMENT_STATS)]
    one, two = (read_trajectory(run)[columns] for run in runs.values())
    assert one["grad_dot"].notna().sum() == 2 * 2 * 3  # 2 evaluations x 2 splits x 3 pairs
    pd.testing.assert_frame_equal(one, two, rtol=1e-4, atol=1e-6)
