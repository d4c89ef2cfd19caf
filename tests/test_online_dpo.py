"""Online DPO (``pairs: policy_ranked``, configs/online_dpo.yaml) on tiny models: k samples per prompt ranked by a
``dynlab judge`` backend (a reward model by score, a logit judge by Copeland wins), the best as chosen and the worst
as rejected; ties left out of the loss; every sample kept; a stopped and resumed run samples what an uninterrupted one
does; bad settings refused naming the field."""

from __future__ import annotations

import doctest
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import dynlab.modules.onpolicy
from dynlab.cli import main
from dynlab.errors import InputError
from dynlab.evaluation.judge import LogitJudge, RewardModelJudge, combine_orders, judge_from_spec
from dynlab.losses.logps import IGNORE_INDEX
from dynlab.models.generate import generate_token_ids
from dynlab.models.load import ModelSpec, load_tokenizer, tiny_model
from dynlab.models.sampling import SamplingSpec, prompt_ids_of, sample_seed
from dynlab.modules import DPOModule
from dynlab.modules.dpo import sample_stats, with_sampled_rejected  # noqa: F401 - still importable from dpo
from dynlab.modules.onpolicy import copeland_wins, kept_mean, rank_samples, rank_values
from tests.conftest import CONFIGS
from tests.test_chat import one_thread  # noqa: F401 - a fixture
from tests.test_judge import PROMPTS, tiny_rm_dir  # noqa: F401 - a fixture
from tests.test_modules import probe_rows, read_metrics
from tests.test_onpolicy import pairs, read_samples
from tests.test_resume import assert_same_run, checkpoint_every

ONLINE = ["fit", "--config", str(CONFIGS / "online_dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
SHORT = "--model.init_args.sampling.max_new_tokens=6"


def ranker(spec: str) -> str:
    return f"--model.init_args.ranker={spec}"


@pytest.fixture
def flat_rm_dir(tiny_rm_dir: Path, tmp_path: Path) -> Path:  # noqa: F811 - the fixture
    """The tiny reward model with its score head zeroed: every response scores exactly 0, so every pair ties."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    torch.nn.init.zeros_(model.score.weight)
    out = tmp_path / "flat-rm"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_rm_dir).save_pretrained(out)
    return out


# --- ranking, as pure functions -------------------------------------------------------------------------------------


def test_doctests():
    assert doctest.testmod(dynlab.modules.onpolicy).failed == 0


@pytest.mark.parametrize(("values", "samples", "best", "worst", "tied"), [
    ([0.3, -2.0, 1.5, 0.0], None, 2, 1, False),
    ([1.0, 3.0, 3.0, -1.0, -1.0], None, 1, 4, False),  # first of the best, last of the worst
    ([0.5, 0.5], None, 0, 1, True),  # the judge cannot tell them apart
    ([2.0, 2.0, 2.0], None, 0, 2, True),
    ([1.0, 0.0], [[4, 5], [4, 5]], 0, 1, True),  # the same response, whatever it scored
    ([1.0, 0.0], [[4, 5], [4, 6]], 0, 1, False),
])
def test_ranking_picks_the_best_and_the_worst_and_flags_ties(values, samples, best, worst, tied):
    r = rank_values(values, samples)
    assert (r.best, r.worst, r.tied) == (best, worst, tied)
    assert r.margin == values[best] - values[worst]
    with pytest.raises(ValueError, match="at least 2"):
        rank_values([1.0])


def test_copeland_counts_a_win_only_when_both_orders_agree():
    # 0 beats 1 in both orders; 0 vs 2: the orders disagree (a tie); 2 beats 1 in both orders
    verdicts = {(0, 1): ("A", "B"), (0, 2): ("A", "A"), (1, 2): ("B", "A")}
    outcomes = {pair: combine_orders(*v) for pair, v in verdicts.items()}
    assert outcomes == {(0, 1): "win", (0, 2): "tie", (1, 2): "loss"}
    wins = copeland_wins(3, outcomes)
    assert wins == [1.5, 0.0, 1.5] and sum(wins) == 3  # k(k-1)/2 games
    r = rank_values(wins)
    assert (r.best, r.worst, r.tied, r.margin) == (0, 1, False, 1.5)
    assert rank_values(copeland_wins(3, dict.fromkeys(outcomes, "tie"))).tied  # all ties: 1 win each
    cycle = {(0, 1): "win", (0, 2): "loss", (1, 2): "win"}  # 0 > 1 > 2 > 0
    assert copeland_wins(3, cycle) == [1.0, 1.0, 1.0] and rank_values(copeland_wins(3, cycle)).tied


def test_ties_get_weight_zero_and_none_kept_is_a_zero_loss_with_a_graph():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    losses = w * torch.tensor([1.0, 10.0, 3.0])  # (3,): 1, 20, 9
    loss = kept_mean(losses, torch.tensor([True, False, True]))
    assert loss.item() == 5.0  # (1 + 9) / 2: the tie in between counts for nothing
    loss.backward()
    assert w.grad.tolist() == [0.5, 0.0, 1.5]
    w.grad = None
    none = kept_mean(w * 2, torch.tensor([False, False, False]))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert w.grad.tolist() == [0.0, 0.0, 0.0]


# --- ranking with the real judges -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_a_reward_model_ranks_by_its_scores(tiny_rm_dir):  # noqa: F811 - the fixture
    judge = judge_from_spec(f"rm:{tiny_rm_dir}", batch_size=3)
    samples = [["Paris.", "I do not know.", "Rome, maybe.", "Paris is the capital of France."],
               ["Yes.", "No."]]
    prompts = PROMPTS[:2]
    rankings, kind = rank_samples(judge, prompts, samples)
    assert kind == "scores"
    for prompt, row, r in zip(prompts, samples, rankings):
        alone = [RewardModelJudge(str(tiny_rm_dir), batch_size=1).score([(prompt, s)])[0] for s in row]
        assert r.values == pytest.approx(alone, abs=1e-4)  # each sample scored on its own: batching changes nothing
        assert r.best == max(range(len(row)), key=lambda i: alone[i])
        assert r.worst == min(range(len(row)), key=lambda i: alone[i])
        assert not r.tied and r.margin == pytest.approx(max(alone) - min(alone), abs=1e-4)
    assert not judge._scores  # the per-step cache is emptied: it would grow with every step's fresh samples


@pytest.mark.usefixtures("one_thread")
def test_a_pairwise_judge_ranks_by_copeland_wins_over_both_orders():
    judge = judge_from_spec("hf:tiny")
    assert isinstance(judge, LogitJudge)
    samples = [["Paris.", "I do not know.", "Rome, maybe."], ["Yes.", "Yes."]]
    rankings, kind = rank_samples(judge, PROMPTS[:2], samples, [[[1], [2], [3]], [[7], [7]]])
    assert kind == "wins"
    for prompt, row, r in zip(PROMPTS, samples, rankings):
        k = len(row)
        outcomes = {(i, j): combine_orders(judge.judge([(prompt, row[i], row[j])])[0].verdict,
                                           judge.judge([(prompt, row[j], row[i])])[0].verdict)
                    for i in range(k) for j in range(i + 1, k)}
        assert r.values == copeland_wins(k, outcomes) and sum(r.values) == k * (k - 1) / 2
        assert (r.best, r.worst) == (rank_values(r.values).best, rank_values(r.values).worst)
    assert rankings[1].tied  # the same response twice


# --- the module -----------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_the_rebuilt_batch_is_the_best_and_the_worst_of_k_policy_samples(tiny_spec, tiny_rm_dir, tmp_path):  # noqa: F811
    module = DPOModule(policy=tiny_spec, pairs="policy_ranked", ranker=f"rm:{tiny_rm_dir}",
                       sampling=SamplingSpec(max_new_tokens=5, num_samples=3))
    module._run_dir = tmp_path
    module.log = module.log_dict = lambda *args, **kwargs: None
    batch, rows = pairs(module)
    prompts = [p for p, _, _ in rows]
    rng = torch.get_rng_state()
    new, keep = module.sample_ranked_pairs(batch)
    assert torch.equal(torch.get_rng_state(), rng) and module.policy.training
    # one batched call over the 3 copies of each prompt, seeded by (seed, step, rank)
    flat = generate_token_ids(module.policy, module.tokenizer, [p for p in prompts for _ in range(3)],
                              max_new_tokens=5, seed=sample_seed(0, 0, 0), batch_size=9)
    kept = read_samples(tmp_path)["step_00000000_rank0.jsonl"]
    assert [r["index"] for r in kept] == [10, 11, 12]
    judge = RewardModelJudge(str(tiny_rm_dir))
    pad, half = module.tokenizer.pad_token_id, 3
    for k, (prompt, row) in enumerate(zip(prompts, kept)):
        assert row["sample_ids"] == flat[3 * k : 3 * k + 3] and row["seed"] == sample_seed(0, 0, 0)
        assert row["samples"] == [module.tokenizer.decode(s, skip_special_tokens=True) for s in row["sample_ids"]]
        scores = judge.score([(row["prompt"], s) for s in row["samples"]])
        assert row["scores"] == pytest.approx(scores, abs=1e-4)
        assert row["chosen"] == max(range(3), key=lambda i: scores[i])
        assert row["rejected"] == min(range(3), key=lambda i: scores[i])
        assert bool(keep[k]) == (not row["tied"])
        for batch_row, pick in ((k, row["chosen"]), (half + k, row["rejected"])):
            response = row["sample_ids"][pick]
            n = len(prompt) + len(response)
            assert new["input_ids"][batch_row, :n].tolist() == prompt + response
            assert (new["input_ids"][batch_row, n:] == pad).all()
            assert new["labels"][batch_row].tolist() == [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * (
                new["labels"].shape[1] - n)
    assert torch.equal(new["index"], batch["index"])
    assert prompt_ids_of(new) == prompts
    # policy = reference: every kept pair's DPO logit is 0
    assert module.training_step(batch, 0).item() == pytest.approx(math.log(2))


def test_online_dpo_fit_with_a_logit_judge_ranks_keeps_every_sample_and_logs_as_dpo(in_tmp):
    main([*ONLINE, SHORT, ranker("hf:tiny"), "--trainer.max_steps=3", "--model.init_args.sampling.num_samples=3"])
    run = in_tmp / "runs" / "online_dpo" / "version_0"
    rows = read_metrics(run)
    losses = {int(r["step"]): r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == [0, 1, 2] and all(math.isfinite(v) for v in losses.values())
    probes = probe_rows(rows)
    assert sorted(probes) == [0, 3] and math.isfinite(probes[3]["probe/test/logp/rejected"])  # probes unchanged
    assert all("train/rewards/margin" in r for r in rows if "train/loss" in r)
    samples = read_samples(run)
    assert list(samples) == [f"step_{s:08d}_rank0.jsonl" for s in range(3)]
    logged = {int(r["step"]): r for r in rows if "train/ranking/tie_fraction" in r}
    assert sorted(logged) == [0, 1, 2]
    judge = judge_from_spec("hf:tiny")  # the ranker, rebuilt: its verdicts are deterministic
    eos = load_tokenizer(ModelSpec(name_or_path="tiny")).eos_token_id
    for step, name in enumerate(samples):
        kept = samples[name]
        assert len(kept) == 4  # one row per prompt of the batch of 4
        assert all(len(r["samples"]) == len(r["sample_ids"]) == len(r["wins"]) == 3 for r in kept)
        assert all(r["seed"] == sample_seed(0, step, 0) and all(1 <= n <= 6 for n in r["tokens"]) for r in kept)
        again, kind = rank_samples(judge, [r["prompt"] for r in kept], [r["samples"] for r in kept],
                                   [r["sample_ids"] for r in kept])
        assert kind == "wins"
        assert [(r["wins"], r["chosen"], r["rejected"], r["tied"]) for r in kept] == \
            [(a.values, a.best, a.worst, a.tied) for a in again]
        ties = [r["tied"] for r in kept]
        assert logged[step]["train/ranking/tie_fraction"] == pytest.approx(sum(ties) / 4)
        assert logged[step]["train/ranking/score_margin"] == pytest.approx(
            sum(r["wins"][r["chosen"]] - r["wins"][r["rejected"]] for r in kept) / 4)
        flat = [ids for r in kept for ids in r["sample_ids"]]  # all k*B samples
        stats = sample_stats(flat, [t for r in kept for t in r["samples"]], eos)
        assert len(flat) == 12 and stats["length"] == pytest.approx(sum(len(x) for x in flat) / 12)
        for key in ("length", "eos_fraction"):
            assert logged[step][f"train/sample/{key}"] == pytest.approx(stats[key])
        if all(ties):  # the random tiny judge's position bias: both orders say "A", every pair a tie
            assert losses[step] == 0.0


def test_pairs_that_all_tie_train_nothing(in_tmp, flat_rm_dir):
    main([*ONLINE, SHORT, ranker(f"rm:{flat_rm_dir}"), "--trainer.max_steps=2",
          "--model.init_args.probe_every_n_steps=0"])
    run = in_tmp / "runs" / "online_dpo" / "version_0"
    rows = read_metrics(run)
    assert [r["train/loss"] for r in rows if "train/loss" in r] == [0.0, 0.0]
    assert [r["train/ranking/tie_fraction"] for r in rows if "train/ranking/tie_fraction" in r] == [1.0, 1.0]
    assert all(r["scores"] == [0.0, 0.0] and r["tied"] for kept in read_samples(run).values() for r in kept)
    initial = tiny_model(ModelSpec(name_or_path="tiny")).state_dict()
    final = load_file(run / "export" / "model.safetensors")
    assert all(torch.equal(final[k], initial[k]) for k in final)  # zero gradients: AdamW moved nothing


def test_a_stopped_and_resumed_online_run_samples_and_trains_as_an_uninterrupted_one(in_tmp, monkeypatch,
                                                                                     tiny_rm_dir):  # noqa: F811
    args = [*ONLINE, SHORT, ranker(f"rm:{tiny_rm_dir}"), "--trainer.max_steps=4",
            "--model.init_args.probe_every_n_steps=0", checkpoint_every(2)]
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "whole")
    main(args)
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "stopped")
    main([*args, "--trainer.max_steps=2"])
    main([*args, "--ckpt_path=last"])
    whole, stopped = in_tmp / "runs" / "online_dpo" / "whole", in_tmp / "runs" / "online_dpo" / "stopped"
    assert_same_run(stopped, whole)  # final weights and every step's loss, bitwise
    a, b = read_samples(stopped), read_samples(whole)
    assert list(a) == [f"step_{s:08d}_rank0.jsonl" for s in range(4)] and a == b
    for name in a:
        assert (stopped / "samples" / name).read_bytes() == (whole / "samples" / name).read_bytes()
    assert not all(r["tied"] for kept in a.values() for r in kept)  # the reward model decided: it trained


# --- refusals -------------------------------------------------------------------------------------------------------


NOWHERE = ModelSpec(name_or_path="./no-such-model")  # refused before the policy would load (and fail)


@pytest.mark.parametrize(("kwargs", "field", "says"), [
    ({"pairs": "policy_ranked"}, "model.ranker", "needs a ranker"),
    ({"ranker": "hf:tiny"}, "model.ranker", "only pairs: policy_ranked"),
    ({"pairs": "policy_ranked", "ranker": "hf:tiny", "negatives": "policy"}, "model.pairs", "negatives: policy"),
    ({"pairs": "policy_ranked", "ranker": "hf:tiny", "precompute_ref_logps": True}, "model.precompute_ref_logps",
     "no cached reference"),
    ({"pairs": "policy_ranked", "ranker": "judge-me"}, "model.ranker", "rm:PATH"),
    ({"pairs": "policy_ranked", "ranker": "rm:./nowhere"}, "model.ranker", "sequence-classification"),
    ({"pairs": "policy_ranked", "ranker": "openai:nohost"}, "model.ranker", "BASE_URL"),
    ({"pairs": "sampled"}, "model.pairs", "'dataset' or 'policy_ranked'"),
    ({"pairs": "policy_ranked", "ranker": "hf:tiny", "sampling": SamplingSpec(num_samples=1)},
     "model.sampling.num_samples", "at least 2"),
])
def test_bad_settings_are_refused_naming_the_field(kwargs, field, says):
    with pytest.raises(InputError, match=f"field '{field}'") as err:
        DPOModule(policy=NOWHERE, **kwargs)
    assert says in str(err.value)


def test_policy_ranked_under_fsdp_or_with_accumulation_is_refused(tiny_spec):
    module = DPOModule(policy=tiny_spec, probe_every_n_steps=0, pairs="policy_ranked", ranker="hf:tiny")
    fsdp = SimpleNamespace(strategy=type("FSDPStrategy", (), {})(), accumulate_grad_batches=1)
    with pytest.raises(InputError, match="field 'trainer.strategy': pairs: policy_ranked under FSDP"):
        module.check_strategy(fsdp)
    accumulating = SimpleNamespace(strategy=object(), accumulate_grad_batches=2)
    with pytest.raises(InputError, match="field 'trainer.accumulate_grad_batches'"):
        module.check_strategy(accumulating)


@pytest.mark.parametrize(("extra", "field"), [
    ("--model.init_args.sampling.num_samples=1", "model.sampling.num_samples"),
    ("--model.init_args.negatives=policy", "model.pairs"),
    ("--model.init_args.ranker=bogus", "model.ranker"),
    ("--trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
])
def test_bad_settings_through_the_cli_fail_in_one_line_before_the_run(extra, field, in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*ONLINE, ranker("hf:tiny"), extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"field '{field}'" in err[0], err
    assert not Path("runs").exists()


def test_a_ranker_that_cannot_load_fails_at_fit_start_naming_the_field(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*ONLINE, ranker("hf:./no-such-judge"), "--trainer.max_steps=1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "field 'model.ranker'" in err[-1], err
