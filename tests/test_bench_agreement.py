"""The benchmark's re-implementation of the paper's probe evaluation (batch 1, one forward per response type, full
softmax) must give dynlab's per-example numbers, here on the tiny model: a check of both, and of the benchmark."""

from __future__ import annotations

import pytest
import torch

from benchmarks.probe_vs_paper import (
    PROBE_FILE_TYPES,
    agreement,
    dynlab_probe_stats,
    encode_probe_rows,
    init_probe_state,
    paper_all,
    probe_module,
)
from dynlab.data.formats import load_rows
from dynlab.models.load import ModelSpec
from tests.conftest import SHARED_PROBE_FILE


@pytest.fixture(scope="module")
def tiny_probe_module():
    torch.manual_seed(0)
    return probe_module(ModelSpec(name_or_path="tiny"), "cpu", torch.float32)


def test_paper_method_agrees_with_dynlab_probe_scoring(tiny_probe_module):
    if not SHARED_PROBE_FILE.is_file():
        pytest.skip(f"no {SHARED_PROBE_FILE}")
    module, types = tiny_probe_module, list(PROBE_FILE_TYPES)
    # rows 0 and 3 have prompts of very different lengths: one dynlab batch mixes their responses
    rows = load_rows(str(SHARED_PROBE_FILE), format="probe")[:4]
    examples = encode_probe_rows(module.tokenizer, [rows[0], rows[3]], types)
    assert len({len(e["prompt_ids"]) for e in examples}) == 2
    init_probe_state(module, examples, types)
    ours = dynlab_probe_stats(module, examples, "cpu", batch_size=2)
    paper = paper_all(module.policy, examples, "cpu")
    assert set(ours) == set(paper) == {0, 1}
    assert all(set(ours[r]) == set(types) for r in ours)
    worst = agreement(ours, paper)["max_relative_difference"]
    # a random-init model is near uniform: log(1 - max pi) ~ -1/V a token, which float32 resolves only to ~1e-7
    # absolute, so that one metric is compared absolutely; everything else to the benchmark's 1e-5 relative
    assert {m: v for m, v in worst.items() if m != "except_argmax_logp" and v > 1e-5} == {}, worst
    for r in ours:
        for t in types:
            assert abs(ours[r][t]["except_argmax_logp"] - paper[r][t]["except_argmax_logp"]) < 1e-5
