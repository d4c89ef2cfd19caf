"""Slow tier: the paper's qualitative signatures (PAPER_NOTES §9) on real data. ``dynlab reproduce`` at its quick size
(configs/reproduce/quick: SmolLM2-135M on 40 HH helpful-base pairs of the shared probe file; SFT and ExtendSFT, then
the same off-policy DPO from each export, and the first 10 steps of that DPO from the SFT export with y⁻ sampled from
the policy, SPIN-style, for §15), decided by ``dynlab.evaluation.signatures`` — the function behind the
report and ``make reproduce``'s table, so what CI asserts is what a researcher reads.

``SHOWN`` are the signatures the full recipe (``make reproduce``) and this size both show on these rows (§15: this
size; the recipe's on-policy stage is opt-in, ``--stages``). A signature
the recipe does not show at CPU scale is reported "not shown (at this scale)" with its numbers, and is not asserted
here — never loosened until it cannot fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dynlab.evaluation.signatures import check_signatures, signature_table
from dynlab.reproduce import stage_runs
from tests.conftest import CONFIGS, SHARED_PROBE_FILE, run_dynlab

pytestmark = pytest.mark.slow

# decided on probe_train (prompts trained on) and probe_test (held-out prompts); the README's table gives the numbers
# of both sizes. Not asserted: §14 on probe_train and §4, §8, §9 on probe_test (not shown by the full recipe
# either), and §10 on probe_train, which the full recipe shows (Δ chosen −5.2) but the quick size only by 0.4 nats
# (−29 at step 10, −0.4 at step 20: DPO at twice the rate is noisy), a margin a CPU's float rounding could flip.
# §15 (on-policy against off-policy DPO at step 10, measured): probe_train Δ argmax +2.3 against +9.2, Δ chosen +15.5
# against −29.3; probe_test Δ argmax −0.8 against +5.8, Δ chosen −1.2 against −54.2.
SHOWN = {
    "train": {4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 16},
    "test": {5, 6, 7, 10, 11, 12, 13, 14, 15, 16},
}


@pytest.fixture(scope="module")
def reproduced(module_tmp) -> list[Path]:
    if not SHARED_PROBE_FILE.is_file():
        pytest.skip(f"the shared HH rows are not at {SHARED_PROBE_FILE}")
    cwd = module_tmp("reproduce")
    proc = run_dynlab("reproduce", "--data", str(SHARED_PROBE_FILE), "--sizes", str(CONFIGS / "reproduce" / "quick"),
                      "--stages", "sft,extend,dpo,dpo_extend,dpo_onpolicy", "--out", "out", cwd=cwd, timeout=2700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)  # the signature tables and the wall-time split, in the test log
    assert (cwd / "out" / "report.html").is_file()
    return list(stage_runs(cwd / "out").values())


@pytest.mark.parametrize("split", sorted(SHOWN))
def test_the_recipe_shows_the_papers_signatures(reproduced, split):
    signatures = check_signatures(reproduced, split)  # 12 and 16 once per run
    print(signature_table(signatures))
    assert SHOWN[split] <= {s.id for s in signatures}
    failed = [f"{s.id} ({', '.join(s.runs)}): {s.claim} {s.numbers} {s.detail}" for s in signatures
              if s.id in SHOWN[split] and s.passed is not True]
    assert not failed, "\n".join(failed)
