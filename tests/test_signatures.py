"""Slow tier: the paper's qualitative signatures (PAPER_NOTES.md §9) on the embedded default, SmolLM2-135M on the
synthetic set: SFT, ExtendSFT, and DPO started from the SFT export (the paper's pipeline; DPO straight from an
instruct model is early in its dynamics: chosen still rises there).

The runs are real `dynlab fit` subprocesses with the shipped configs; only the DPO learning rate is raised
(5e-5) so the squeezing regime is reached within 16 steps on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dynlab.tracking.trajectory import read_trajectory
from tests.conftest import CONFIGS, run_dir_of, run_dynlab

pytestmark = pytest.mark.slow


def fit(cwd: Path, stage: str, *extra: str) -> Path:
    proc = run_dynlab("fit", "--config", str(CONFIGS / f"{stage}.yaml"), *extra, cwd=cwd, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir_of(proc, cwd)


def curves(run: Path, split: str = "train") -> pd.DataFrame:
    """Mean Δlogp per type over steps (index step, columns type), plus the argmax response as ``argmax``."""
    frame = read_trajectory(run)
    frame = frame[frame["split"] == split]
    out = frame.pivot_table(index="step", columns="type", values="dlogp", aggfunc="mean")
    chosen = frame[frame["type"] == "chosen"].pivot_table(index="step", columns="row", values="argmax_logp")
    out["argmax"] = (chosen - chosen.iloc[0]).mean(axis=1)
    for metric in ("energy", "p_e", "a_norm", "max_prob"):
        out[f"chosen_{metric}"] = frame[frame["type"] == "chosen"].groupby("step")[metric].mean()
    out["rejected_logp"] = frame[frame["type"] == "rejected"].groupby("step")["logp"].mean()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, pd.DataFrame]:
    cwd = tmp_path_factory.mktemp("signatures")
    sft = fit(cwd, "sft")
    extend = fit(cwd, "extend_sft")
    dpo = fit(cwd, "dpo", f"--model.init_args.init_from={sft / 'export'}", "--trainer.max_steps=16",
              "--model.init_args.optimizer.init_args.lr=5e-5")
    result = {"sft": curves(sft), "extend": curves(extend), "dpo": curves(dpo), "sft_test": curves(sft, "test")}
    for name, frame in result.items():  # the numbers behind a failure, in the test log
        print(f"\n{name}\n{frame.round(3).T}")
    return result


def test_sft_raises_chosen_steadily_and_the_argmax(runs):
    sft = runs["sft"]
    assert sft["chosen"].iloc[-1] > 5.0
    assert sft["chosen"].is_monotonic_increasing
    assert sft["argmax"].iloc[-1] > 0
    first, last = sft.iloc[0], sft.iloc[-1]
    assert last["chosen_energy"] < first["chosen_energy"] and last["chosen_p_e"] < first["chosen_p_e"]
    assert last["chosen_a_norm"] > first["chosen_a_norm"]  # predictions along y+ become peakier


def test_sft_raises_irr_train_more_than_irr_test(runs):
    # hallucination: responses trained on (for other prompts) gain more than never-trained ones
    for key in ("sft", "sft_test"):
        last = runs[key].iloc[-1]
        assert last["irr_train"] > last["irr_test"], key


def test_sft_random_types_and_rejected_gain_less_than_chosen(runs):
    last = runs["sft"].iloc[-1]
    assert last["random_permute"] < last["chosen"] and last["random_nonhum"] < last["chosen"]
    assert 0 < last["rejected"] < last["chosen"]  # y- rises (shared format) but less than y+


def test_dpo_lowers_rejected_far_more_than_chosen(runs):
    last = runs["dpo"].iloc[-1]
    assert last["rejected"] < -10 and last["rejected"] < last["chosen"] - 10


def test_dpo_squeezing_chosen_ends_below_start_while_argmax_rises(runs):
    dpo = runs["dpo"]
    last = dpo.iloc[-1]
    assert last["chosen"] < 0, "chosen should end below its start (squeezing)"
    assert last["argmax"] > 0, "the argmax response should gain"
    assert dpo["chosen_max_prob"].iloc[-1] > dpo["chosen_max_prob"].iloc[0]
    for t in ("irr_train", "irr_test", "irr_hum", "random_permute", "random_nonhum"):
        assert last[t] < 0, t  # every other probe type falls


def test_extend_sft_starts_dpo_with_rejected_higher(runs):
    # after ExtendSFT (SFT on chosen AND rejected), log pi(y-) is higher than after plain SFT: both stages start
    # from the same SmolLM2 weights, so compare where each ends (= where its DPO starts)
    assert runs["extend"]["rejected_logp"].iloc[-1] > runs["sft"]["rejected_logp"].iloc[-1] + 5
