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


def test_probe_flops_counts_the_matmuls_dynlab_runs():
    """The benchmark's FLOP count (its hardware-ceiling numerator) against torch's own count of the matrix products
    dynlab's probe evaluation runs: equal up to the length groups' padding (at most 10% of the response tokens) and
    the normalisation weights, which the count includes in the body's parameters."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.probe_vs_paper import probe_flops

    if not SHARED_PROBE_FILE.is_file():
        pytest.skip(f"no {SHARED_PROBE_FILE}")
    module, types = probe_module(ModelSpec(name_or_path="tiny"), "cpu", torch.float32), list(PROBE_FILE_TYPES)
    examples = encode_probe_rows(module.tokenizer, load_rows(str(SHARED_PROBE_FILE), format="probe")[:3], types)
    init_probe_state(module, examples, types)
    with FlopCounterMode(display=False) as counter:
        dynlab_probe_stats(module, examples, "cpu", batch_size=3)
    products = sum(n for op, n in counter.get_flop_counts()["Global"].items()
                   if op.__name__.split(".")[0] in ("mm", "addmm", "bmm"))
    counted = probe_flops(module.policy, examples)
    assert counted["total"] == counted["body"] + counted["vocabulary_projection"]
    assert 0.97 * counted["total"] <= products <= 1.12 * counted["total"], (products, counted)


def test_probe_ceiling_runs_on_a_random_model_of_the_real_shape(tmp_path):
    """benchmarks/probe_ceiling.py (the GPU machine's probe-evaluation figure: no weights or data files needed) on one
    decoder layer of SmolLM2's shape, bf16 against fp32: a FLOP/s fraction and finite differences."""
    from benchmarks.probe_ceiling import main as probe_ceiling

    result = probe_ceiling(["--quick", "--layers", "1", "--dtype", "bf16", "--out", str(tmp_path)])
    ceiling = result["hardware_ceiling"]
    assert ceiling["flops"]["total"] > 0 and 0 < ceiling["fraction"] < 2 and "pass" in ceiling
    assert result["bf16_against_fp32"]["finite"] and (tmp_path / "probe_ceiling.json").is_file()
