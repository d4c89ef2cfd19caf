"""Likelihood-displacement diagnostics: CHES and normalised CHES from the probe evaluation against one plain HF forward
per (prompt + response), the edit statistics and rate ratio on hand-worked values, ``dynlab probe diagnose``'s ranked
table, and ``data.drop_most_displacing``, all on the tiny model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import yaml

from dynlab.cli import DynlabCLI, main
from dynlab.data.datamodule import ProbeDataModule
from dynlab.errors import InputError
from dynlab.metrics.displacement import (
    PAIR_STATS,
    edit_distance,
    first_difference,
    pair_edit_stats,
    rate_ratio,
    top_fraction,
)
from dynlab.metrics.probe import DisplacementMetric
from dynlab.models.load import ModelSpec
from dynlab.modules import DPOModule, SFTModule
from dynlab.tracking.trajectory import read_trajectory
from tests.conftest import CONFIGS

TINY_DATA = dict(num_train=16, num_heldout=8, probe_size=6, probe_batch_size=4, max_length=128, max_prompt_length=64)


# ---- references -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def response_state_sum(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """W_y by brute force: one plain forward of prompt + response; the states at positions P-1 .. P+L-2 (those that
    predict the response's tokens), summed in float64. (H,)"""
    out = model(input_ids=torch.tensor(prompt + response)[None], output_hidden_states=True)
    states = out.hidden_states[-1][0]  # (T, H)
    # the last entry is what the LM head multiplies: after the final norm
    torch.testing.assert_close(model.get_output_embeddings()(states), out.logits[0], rtol=1e-5, atol=1e-5)
    return states[len(prompt) - 1 : -1].double().sum(dim=0)


def brute_ches(model, prompt: list[int], chosen: list[int], rejected: list[int]) -> tuple[float, float]:
    wc, wr = response_state_sum(model, prompt, chosen), response_state_sum(model, prompt, rejected)
    nc, nr = len(chosen), len(rejected)
    return (wc @ wr - wc @ wc).item(), (wc @ wr / (nc * nr) - wc @ wc / nc**2).item()


def levenshtein(a: list, b: list) -> int:
    """The textbook dynamic programme, cell by cell."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def assert_rel(got: float, want: float, rel: float = 1e-5) -> None:
    assert abs(got - want) <= rel * abs(want), (got, want)


# ---- the pure maths -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("a", "b", "distance", "first"), [
    ("kitten", "sitting", 3, 0),
    ("flaw", "lawn", 2, 0),
    ("abc", "abc", 0, 3),
    ("abc", "abcde", 2, 3),  # a prefix: first_diff is the shorter length
    ("", "abc", 3, 0),
    ("", "", 0, 0),
    ("abcdef", "abXdef", 1, 2),
    ("abcdef", "abdef", 1, 2),
])
def test_edit_distance_and_first_difference_on_hand_worked_cases(a, b, distance, first):
    a_ids, b_ids = [ord(c) for c in a], [ord(c) for c in b]
    assert edit_distance(a_ids, b_ids) == edit_distance(b_ids, a_ids) == distance
    assert first_difference(a_ids, b_ids) == first
    stats = pair_edit_stats([a_ids], [b_ids])
    assert stats["edit_distance"].item() == distance and stats["first_diff"].item() == first
    assert stats["edit_distance_norm"].item() == pytest.approx(distance / max(len(a), len(b), 1))


def test_edit_distance_equals_the_textbook_programme_on_random_token_ids():
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        a = torch.randint(4, (int(torch.randint(0, 30, (1,), generator=gen)),), generator=gen).tolist()
        b = torch.randint(4, (int(torch.randint(0, 30, (1,), generator=gen)),), generator=gen).tolist()
        assert edit_distance(a, b) == levenshtein(a, b), (a, b)


def test_rate_ratio_on_hand_values_and_its_guard():
    dr, dc = torch.tensor([-2.0, 1.0, -3.0, 5.0]), torch.tensor([-1.0, 0.5, 1e-4, -2e-3])
    got = rate_ratio(dr, dc)
    assert got[:2].tolist() == [2.0, 2.0] and math.isnan(got[2]) and got[3].item() == pytest.approx(-2500.0)
    metric = DisplacementMetric()
    ones = {name: torch.ones(2) for name in PAIR_STATS}
    metric.update(ones, since_start=(dc[:2], dr[:2]))
    metric.update(ones, since_start=(dc[2:], dr[2:]), since_previous=(torch.tensor([1e-5, 1e-5]), torch.ones(2)))
    out = metric.compute()
    # ratio of the means: (-2 + 1 - 3 + 5) / (-1 + 0.5 + 1e-4 - 2e-3); the pair mean skips the NaN pair
    assert out["rate_ratio"].item() == pytest.approx(1.0 / (-0.5 + 1e-4 - 2e-3), rel=1e-6)
    assert out["rate_ratio_pair_mean"].item() == pytest.approx((2 + 2 - 2500) / 3, rel=1e-6)
    # since the previous evaluation y+ moved by 1e-5 on average: undefined, left out (as is its pair mean)
    assert "rate_ratio_step" not in out and "rate_ratio_step_pair_mean" not in out
    assert all(out[name].item() == 1.0 for name in PAIR_STATS)


def test_top_fraction_takes_the_floor_of_the_fraction_highest_first():
    scores = [0.5, 3.0, float("nan"), 2.0, 3.0, -1.0, 0.0, 1.0, 4.0, 2.5]
    assert top_fraction(scores, 0.0) == []
    assert top_fraction(scores, 0.29) == [8, 1]  # floor(2.9) = 2
    assert top_fraction(scores, 0.3) == [8, 1, 4]  # ties: the lower index first
    assert top_fraction(scores, 0.99) == [8, 1, 4, 9, 3, 7, 0, 6, 5]  # NaN ranks last: the tenth, not taken
    with pytest.raises(ValueError):
        top_fraction(scores, 1.0)


# ---- CHES in the probe evaluation -----------------------------------------------------------------------------------
def test_probe_evaluation_ches_equals_a_plain_forward_per_example(tiny_spec):
    module = SFTModule(policy=tiny_spec).eval()
    dm = ProbeDataModule(**TINY_DATA)
    dm.prepare(module.tokenizer, "sft")
    module.init_probe_state(dm)
    assert len(dm.probe_types["train"]) > 2  # other types share the groups: sums must keep to chosen and rejected
    per_row = {}
    for batch in dm.probe_dataloader("train"):
        results = module.probe_step("train", batch)
        chosen = results["chosen"]
        for i, row in enumerate(chosen["row"].tolist()):
            per_row[row] = {m: chosen[m][i].item() for m in PAIR_STATS}
    assert sorted(per_row) == list(range(len(dm.probe_examples["train"])))
    for example in dm.probe_examples["train"]:
        got, r = per_row[example["index"]], example["responses"]
        want_ches, want_norm = brute_ches(module.policy, example["prompt_ids"], r["chosen"], r["rejected"])
        assert_rel(got["ches"], want_ches)
        assert_rel(got["ches_norm"], want_norm)
        assert got["edit_distance"] == levenshtein(r["chosen"], r["rejected"])
        assert got["edit_distance_norm"] == pytest.approx(got["edit_distance"] / max(len(r["chosen"]),
                                                                                     len(r["rejected"])))
        assert got["first_diff"] == first_difference(r["chosen"], r["rejected"])
    logged = module.compute_probe_metrics()
    for m in PAIR_STATS:  # the logged means are the means of the per-pair values
        assert_rel(logged[f"probe/train/{m}"].item(), sum(v[m] for v in per_row.values()) / len(per_row))
    assert "probe/train/rate_ratio" not in logged  # no step-0 baseline was recorded here


def read_metrics(run: Path) -> dict[int, dict[str, float]]:
    with open(run / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return {int(r["step"]): r for r in rows if "probe/train/ches" in r}


def assert_rate_ratios(logged: dict[int, dict[str, float]], by: dict[str, pd.DataFrame]) -> None:
    """The rate ratios logged and stored at steps 3 and 6 against the log-probs in the trajectory itself."""
    for step, previous in ((3, 0), (6, 3)):
        c, r = by["chosen"].loc[step], by["rejected"].loc[step]
        assert_rel(logged[step]["probe/train/rate_ratio"], r["dlogp"].sum() / c["dlogp"].sum())
        dc = c["logp"] - by["chosen"].loc[previous, "logp"]
        dr = r["logp"] - by["rejected"].loc[previous, "logp"]
        want = (dr / dc).where(dc.abs() >= 1e-3)
        pd.testing.assert_series_equal(c["rate_ratio_step"], want, check_names=False, rtol=1e-4)
        assert_rel(logged[step]["probe/train/rate_ratio_step"], dr.sum() / dc.sum(), rel=1e-4)
        defined = (c["rate_ratio_step"]).dropna()
        assert_rel(logged[step]["probe/train/rate_ratio_step_pair_mean"], defined.mean(), rel=1e-4)


def trajectory_by_type(run: Path) -> dict[str, pd.DataFrame]:
    frame = read_trajectory(run)
    train = frame[frame["split"] == "train"]
    return {t: train[train["type"] == t].set_index(["step", "row"]) for t in ("chosen", "rejected")}


def test_a_resumed_run_takes_the_previous_evaluation_from_its_checkpoint(in_tmp, monkeypatch):
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "resumed")
    args = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"), "--ckpt_path=last",
            '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            '"init_args": {"every_n_train_steps": 3, "save_top_k": -1}}]']
    main([*args, "--trainer.max_steps=3"])
    main([*args, "--trainer.max_steps=6"])  # step 6's "previous" is step 3, known only from the checkpoint
    run = Path("runs/dpo/resumed")
    logged = read_metrics(run)
    assert sorted(logged) == [0, 3, 6] and "probe/train/rate_ratio_step" in logged[6]
    assert_rate_ratios(logged, trajectory_by_type(run))


def test_fit_logs_the_means_stores_the_pairs_and_checkpoints_the_previous_evaluation(in_tmp):
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")])
    run = next(Path("runs", "dpo").glob("version_*"))
    logged, by = read_metrics(run), trajectory_by_type(run)
    assert sorted(logged) == [0, 3, 6]
    for step in (0, 3, 6):
        chosen = by["chosen"].loc[step]
        for m in PAIR_STATS:  # per pair in the store (the chosen type's record), the logged value their mean
            assert_rel(logged[step][f"probe/train/{m}"], chosen[m].mean())
    assert "probe/train/rate_ratio" not in logged[0] and by["chosen"].loc[0, "rate_ratio"].isna().all()
    assert_rate_ratios(logged, by)
    # the checkpoint carries the last evaluation's log-probs, the "previous" of a resumed run's next evaluation
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    previous = ckpt["dynlab_probe_previous_logp"]["train"]  # (rows, types)
    types = list(json.loads((run / "probes" / "probe_train.jsonl").read_text().splitlines()[0]))[1:]
    column = types.index("chosen")
    torch.testing.assert_close(previous[:, column], torch.tensor(by["chosen"].loc[6, "logp"].to_numpy()),
                               check_dtype=False)
    module = DPOModule(policy=ModelSpec(name_or_path="tiny"))
    module.on_load_checkpoint(ckpt)
    torch.testing.assert_close(module._previous_logp["train"], previous)


# ---- diagnose -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_diagnose_writes_the_training_pairs_ranked_by_normalised_ches(in_tmp, capsys, suffix):
    configs = ["--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
    out = in_tmp / f"pairs{suffix}"
    main(["probe", "diagnose", *configs, "--out", str(out), "--batch-size", "3"])
    captured = capsys.readouterr()
    assert "dynlab: probe diagnose: 16/16 pairs" in captured.err
    table = pd.read_json(out, lines=True) if suffix == ".jsonl" else pd.read_parquet(out)
    assert list(table.columns) == ["rank", "index", "prompt", *PAIR_STATS, "chosen_len", "rejected_len"]
    assert table["rank"].tolist() == list(range(16)) and sorted(table["index"]) == list(range(16))
    assert table["ches_norm"].is_monotonic_decreasing
    cli = DynlabCLI(args=configs, run=False)  # the same initial model and data, built independently
    pairs = {p["index"]: p for p in cli.datamodule.training_pairs(cli.model.tokenizer)}
    for row in table.itertuples():
        p = pairs[row.index]
        chosen, rejected = p["responses"]["chosen"], p["responses"]["rejected"]
        want_ches, want_norm = brute_ches(cli.model.policy, p["prompt_ids"], chosen, rejected)
        assert_rel(row.ches, want_ches)
        assert_rel(row.ches_norm, want_norm)
        assert row.prompt == p["prompt"]
        assert (row.edit_distance, row.first_diff) == (levenshtein(chosen, rejected), first_difference(chosen,
                                                                                                       rejected))
        assert (row.chosen_len, row.rejected_len) == (len(chosen), len(rejected))


@pytest.mark.parametrize(("args", "field"), [(["--out", "pairs.csv"], "--out"),
                                             (["--out", "pairs.jsonl", "--batch-size", "0"], "--batch-size")])
def test_diagnose_bad_arguments_name_the_field(in_tmp, capsys, args, field):
    with pytest.raises(SystemExit) as exit_:
        main(["probe", "diagnose", "--config", str(CONFIGS / "dpo.yaml"), *args])
    assert exit_.value.code == 2
    assert field in capsys.readouterr().err
    assert not list(in_tmp.iterdir())


# ---- drop_most_displacing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5])
def test_drop_most_displacing_drops_exactly_the_top_fraction(tiny_spec, fraction, caplog):
    module = DPOModule(policy=tiny_spec)
    dm = ProbeDataModule(**TINY_DATA, drop_most_displacing=fraction)
    dm.prepare(module.tokenizer, "dpo", score=module.score_pairs)
    pairs = ProbeDataModule(**TINY_DATA).training_pairs(module.tokenizer)
    brute = {p["index"]: brute_ches(module.policy, p["prompt_ids"], p["responses"]["chosen"],
                                    p["responses"]["rejected"])[1] for p in pairs}
    want = sorted(brute, key=lambda i: -brute[i])[: int(fraction * len(pairs))]
    assert [d["index"] for d in dm.dropped_pairs] == want
    kept = [p for p in pairs if p["index"] not in want]
    assert [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in dm.train_examples] == \
        [(p["prompt_ids"], p["responses"]["chosen"], p["responses"]["rejected"]) for p in kept]
    assert [e["index"] for e in dm.train_examples] == list(range(len(kept)))  # what the reference cache indexes
    if fraction:
        assert f"dropped {len(want)} of {len(pairs)} training pairs" in caplog.text
    else:
        assert "dropped" not in caplog.text


def test_a_run_with_drop_most_displacing_lists_the_dropped_pairs(in_tmp, tiny_spec):
    module = DPOModule(policy=tiny_spec, probe_every_n_steps=0)
    dm = ProbeDataModule(**TINY_DATA, drop_most_displacing=0.25)
    trainer = L.Trainer(max_steps=1, default_root_dir=in_tmp, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, logger=L.pytorch.loggers.CSVLogger(in_tmp, name="run"))
    trainer.fit(module, datamodule=dm)
    listed = [json.loads(line) for line in (Path(trainer.log_dir) / "dropped_pairs.jsonl").read_text().splitlines()]
    assert [d["index"] for d in listed] == [d["index"] for d in dm.dropped_pairs] and len(listed) == 4
    assert set(listed[0]) == {"index", "prompt", *PAIR_STATS, "chosen_len", "rejected_len"}
    assert [d["ches_norm"] for d in listed] == sorted((d["ches_norm"] for d in listed), reverse=True)
    assert len(dm.train_examples) == 12


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_bad_drop_fraction_names_the_field(value):
    with pytest.raises(InputError, match="data.drop_most_displacing"):
        ProbeDataModule(drop_most_displacing=value)


def test_drop_without_a_scorer_names_the_field(tiny_spec):
    module = SFTModule(policy=tiny_spec)
    with pytest.raises(InputError, match="data.drop_most_displacing"):
        ProbeDataModule(**TINY_DATA, drop_most_displacing=0.5).prepare(module.tokenizer, "sft")


def test_dynlab_fit_drops_the_most_displacing_pairs(in_tmp):
    """Through the CLI: `dynlab fit` scores the training pairs under the initial model before training and lists the
    dropped quarter in RUN_DIR/dropped_pairs.jsonl."""
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
          "--data.init_args.drop_most_displacing=0.25", "--trainer.max_steps=1",
          "--model.init_args.probe_every_n_steps=0"])
    run = next(Path("runs", "dpo").glob("version_*"))
    dropped = [json.loads(line) for line in (run / "dropped_pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    num_train = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["data"]["init_args"]["num_train"]
    assert len(dropped) == int(0.25 * num_train)
    scores = [row["ches_norm"] for row in dropped]
    assert scores == sorted(scores, reverse=True)
