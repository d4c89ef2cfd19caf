"""``dynlab reward-model`` on the tiny random-init model: the Bradley–Terry fit, the saved directory loaded back as an
``rm:DIR`` judge scoring exactly features·w, a separable toy case, and one-line errors for bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dynlab.cli import main
from dynlab.evaluation.judge import RewardModelJudge, judge_from_spec, reward_text
from dynlab.evaluation.reward_model import (
    build_reward_model,
    fit_bradley_terry,
    pairwise_stats,
    parse_rows,
    pooled_features,
    train_reward_model,
)

WORDS = "the a cat dog runs fast slow red blue green house tree sky river stone bread".split()
MARK = " thanks"  # only chosen responses have it (at their end): separable by construction


def toy_file(path: str, n: int = 40, seed: int = 0) -> str:
    """HH rows whose chosen response ends with MARK and whose rejected never contains it."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = "\n\nHuman: " + " ".join(rng.choices(WORDS, k=5)) + "?\n\nAssistant:"
            chosen = " " + " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) + MARK
            rejected = " " + " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


# --- maths ----------------------------------------------------------------------------------------------------------


def test_bradley_terry_recovers_the_direction_and_is_scale_free():
    gen = torch.Generator().manual_seed(0)
    truth = torch.tensor([2.0, -1.0, 0.0, 0.5], dtype=torch.float64)
    d = torch.randn(400, 4, generator=gen, dtype=torch.float64)
    d = torch.where(torch.rand(400, 1, generator=gen, dtype=torch.float64) < torch.sigmoid(d @ truth)[:, None], d, -d)
    w = fit_bradley_terry(d, l2=1e-3)
    assert torch.nn.functional.cosine_similarity(w, truth, dim=0) > 0.97
    # features rescaled by 10: the standardised problem is the same, so the raw head is 10 times smaller
    torch.testing.assert_close(fit_bradley_terry(d * 10, l2=1e-3), w / 10, rtol=1e-5, atol=1e-8)
    # a larger penalty shrinks the head
    assert fit_bradley_terry(d, l2=100.0).norm() < w.norm()


def test_bradley_terry_stationary_point_by_hand():
    # one feature, differences +1 (twice) and -1: the gradient of 2 softplus(-v) + softplus(v) + l2/2 v^2 vanishes
    # at -2 sigmoid(-v) + sigmoid(v) + l2 v = 0; with l2 = 1 that is v = 0.2865 (solved by bisection below)
    d = torch.tensor([[1.0], [1.0], [-1.0]], dtype=torch.float64)
    lo, hi = 0.0, 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        g = -2 * torch.sigmoid(torch.tensor(-mid)) + torch.sigmoid(torch.tensor(mid)) + mid
        lo, hi = (mid, hi) if g < 0 else (lo, mid)
    w = fit_bradley_terry(d, l2=1.0)  # rms of d is 1, so w = v
    assert w.item() == pytest.approx(lo, abs=1e-7) and lo == pytest.approx(0.2865, abs=1e-4)


def test_pairwise_stats_counts_ties_as_half():
    d = torch.tensor([[1.0], [-2.0], [0.0], [3.0]])
    stats = pairwise_stats(d, torch.tensor([1.0]))
    assert stats == {"pairs": 4, "accuracy": 0.625, "mean_margin": 0.5}


def test_parse_rows_is_python_slicing():
    assert list(parse_rows("1:3", 5)) == [1, 2] and list(parse_rows(":2", 5)) == [0, 1]
    assert list(parse_rows("::2", 5)) == [0, 2, 4] and list(parse_rows("-1:", 5)) == [4]
    for bad in ("3", "a:b", "1:2:0", "1:2:3:4"):
        with pytest.raises(ValueError, match="--rows"):
            parse_rows(bad, 5)


# --- training, saving, scoring --------------------------------------------------------------------------------------


def test_features_are_what_the_score_head_reads():
    model, tok = build_reward_model("tiny")
    texts = [reward_text(tok, "\n\nHuman: hi\n\nAssistant:", r) for r in (" a", " the red house by the river")]
    w = torch.randn(model.config.hidden_size)
    with torch.no_grad():
        model.score.weight.copy_(w[None])
    feats = pooled_features(model, tok, texts, batch_size=2)  # (2, H), one padded batch
    alone = torch.stack([pooled_features(model, tok, [t])[0] for t in texts])  # no padding at all
    torch.testing.assert_close(feats, alone, atol=1e-5, rtol=1e-5)
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits[:, 0]
    torch.testing.assert_close(logits, feats @ w, atol=1e-5, rtol=1e-5)


def test_trains_saves_and_loads_as_an_rm_judge_scoring_features_times_w(in_tmp, capsys):
    data = toy_file("toy.jsonl", n=40)
    main(["reward-model", "--data", data, "--base", "tiny", "--out", "rm", "--rows", "0:30", "--heldout-fraction",
          "0.3", "--batch-size", "4"])
    printed = capsys.readouterr()
    assert "heldout: 9 pairs, accuracy 1.000" in printed.out and "train: 21 pairs, accuracy 1.000" in printed.out
    assert "reward-model: chosen 30/30" in printed.err
    summary = json.loads(Path("rm/reward_model.json").read_text())
    assert summary["train"]["accuracy"] == 1.0 and summary["heldout"]["accuracy"] == 1.0
    assert (summary["data"], summary["rows"], summary["row_range"], summary["base"]) == (data, "0:30", [0, 30, 1],
                                                                                         "tiny")
    assert summary["heldout"]["mean_margin"] > 0 and not Path("rm.tmp").exists()

    judge = judge_from_spec("rm:rm")
    assert isinstance(judge, RewardModelJudge) and judge.tokenizer.pad_token is not None
    assert judge.model.config.num_labels == 1

    # the same fit in-process (same seed): the judge's scores are features · w of training, to 1e-5
    fit = train_reward_model(data, "tiny", "rm2", rows="0:30", heldout_fraction=0.3, batch_size=4)
    assert fit.summary["train"] == summary["train"] and fit.summary["heldout"] == summary["heldout"]
    rows = [json.loads(x) for x in Path(data).read_text().splitlines()[:30]]
    scores = torch.tensor(judge.score([(r["prompt"], r["chosen"]) for r in rows]
                                      + [(r["prompt"], r["rejected"]) for r in rows]), dtype=torch.float64)
    expected = torch.cat([fit.chosen.double() @ fit.w, fit.rejected.double() @ fit.w])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # and the verdicts prefer the chosen response on every held-out row, in both orders
    held = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows[fit.n_train:]]
    assert {j.verdict for j in judge.judge(held)} == {"A"}
    assert {j.verdict for j in judge.judge([(p, b, a) for p, a, b in held])} == {"B"}


def test_a_second_run_replaces_an_earlier_reward_model(in_tmp, capsys):
    data = toy_file("toy.jsonl", n=12)
    main(["reward-model", "--data", data, "--base", "tiny", "--out", "rm"])
    main(["reward-model", "--data", data, "--base", "tiny", "--out", "rm", "--l2", "10"])
    assert json.loads(Path("rm/reward_model.json").read_text())["l2"] == 10.0
    assert sorted(p.name for p in Path(".").iterdir()) == ["rm", "toy.jsonl"]


# --- bad input: one line, nothing written ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "missing.jsonl: field '--data': no such data file"),
    (["--rows", "5"], "field '--rows': expected a slice A:B"),
    (["--rows", "x:"], "field '--rows': expected a slice A:B of integers"),
    (["--rows", "10:"], "toy.jsonl: field '--rows': --rows 10: selects 2 of 12 rows, giving 2 training and 0 held-out"),
    (["--rows", ":1", "--heldout-fraction", "0"], "giving 1 training and 0 held-out pairs; need >= 2"),
    (["--heldout-fraction", "1"], "field '--heldout-fraction': must be in [0, 1)"),
    (["--l2", "0"], "field '--l2': must be > 0"),
    (["--out", "toy.jsonl"], "toy.jsonl: field '--out': exists and is not a reward-model directory"),
])
def test_bad_input_is_one_line_and_writes_nothing(in_tmp, capsys, args, message):
    toy_file("toy.jsonl", n=12)
    given = dict(zip(args[::2], args[1::2]))
    argv = ["reward-model", "--data", given.pop("--data", "toy.jsonl"), "--base", "tiny",
            "--out", given.pop("--out", "rm")]
    for key, value in given.items():
        argv += [key, value]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("dynlab")]
    assert len(err) == 1 and message in err[0], err
    assert not Path("rm").exists() and not Path("rm.tmp").exists()


def test_a_bad_row_names_the_file_row_and_field(in_tmp, capsys):
    Path("bad.jsonl").write_text(json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " yes"}) + "\n")
    with pytest.raises(SystemExit):
        main(["reward-model", "--data", "bad.jsonl", "--base", "tiny", "--out", "rm"])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("dynlab")]
    assert len(err) == 1 and "bad.jsonl: row 1: field 'rejected'" in err[0], err
