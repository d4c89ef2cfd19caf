"""The sampling benchmark's machinery at toy size on the tiny model: dynlab's generation against plain
``model.generate`` (the same tokens, greedy and sampled), the on-policy step split, the SimPO memory workers (in-process
and as the fresh process the benchmark spawns), the figures and the report's table."""

from __future__ import annotations

import pytest

from benchmarks import report, sampling
from tests.conftest import SHARED_PROBE_FILE

TOY = ["--models", "tiny", "--prompts", "3", "--max-new-tokens", "10", "--repeats", "2", "--pairs", "2", "--warmup",
       "1", "--steps", "2", "--memory-rounds", "1", "--max-length", "48", "--max-prompt-length", "24"]


@pytest.fixture(scope="module")
def toy():
    if not SHARED_PROBE_FILE.is_file():
        pytest.skip(f"no {SHARED_PROBE_FILE}")
    from benchmarks.common import hh_rows, setup_torch

    args = sampling.parse_args(TOY)
    setup_torch(args)
    return args, hh_rows(limit=8)


def test_plain_generate_gives_dynlab_s_tokens_across_batches(toy):
    """Two batches (3 prompts, batch 2): both seed each batch with seed + its start, so the tokens agree."""
    from dynlab.models.generate import generate_token_ids
    from dynlab.models.load import load_model, load_tokenizer

    args, rows = toy
    spec = sampling.bench_spec("tiny")
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    prompts = [e["prompt_ids"] for e in sampling.preference_examples(tokenizer, rows[:3], 48, 24)]
    common = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, batch_size=2)
    ours = generate_token_ids(model, tokenizer, prompts, **common)
    assert sampling.plain_generate(model, tokenizer, prompts, do_sample=True, **common) == ours
    assert sampling.plain_generate(model, tokenizer, prompts, do_sample=True, **{**common, "seed": 6}) != ours
    eos = tokenizer.eos_token_id
    assert all(0 < len(r) <= 10 and eos not in r[:-1] for r in ours)  # cut after the first EOS, no padding


@pytest.fixture(scope="module")
def generation(toy):
    args, rows = toy
    return sampling.compare_generation("tiny", args, rows)


@pytest.fixture(scope="module")
def steps(toy):
    args, rows = toy
    return sampling.compare_steps("tiny", args, rows)


def test_generation_figures(toy, generation):
    args, _ = toy
    g = generation
    assert g["identical_tokens"] == {"greedy": True, "sampled": True, "sampled_per_round": [True, True]}
    assert g["prompts"] == 3 and g["settings"]["batch_size"] == 3
    dyn, plain = g["systems"]["dynlab"], g["systems"]["plain"]
    assert dyn["generated_tokens"]["values"] == plain["generated_tokens"]["values"]  # the same tokens, counted once
    assert all(0 < n <= 3 * 10 for n in dyn["generated_tokens"]["values"])
    for s in (dyn, plain):
        assert s["tokens_per_second"]["n"] == args.repeats
        assert s["tokens_per_second"]["values"] == pytest.approx(
            [n / t for n, t in zip(s["generated_tokens"]["values"], s["seconds"]["values"])])
    q = g["dynlab_over_plain"]
    assert q["median"] == pytest.approx(dyn["tokens_per_second"]["median"] / plain["tokens_per_second"]["median"])
    assert q["target"] == ">= 1" and q["pass"] == (q["median"] >= 1.0)


def test_step_split(toy, steps):
    args, _ = toy
    st = steps
    for key in ("sampling_seconds", "on_policy_training_seconds", "on_policy_step_seconds", "off_policy_step_seconds"):
        assert st[key]["n"] == args.steps and st[key]["min"] > 0
    assert st["on_policy_step_seconds"]["values"] == pytest.approx(
        [a + b for a, b in zip(st["sampling_seconds"]["values"], st["on_policy_training_seconds"]["values"])])
    q = st["on_policy_over_off_policy_step"]
    on, off = st["on_policy_step_seconds"], st["off_policy_step_seconds"]
    assert q["median"] == pytest.approx(on["median"] / off["median"])
    assert all(0 < n <= args.pairs * args.max_new_tokens for n in st["sampled_tokens_per_step"]["values"])
    assert all(0 < f < 1 for f in st["sampling_share_of_on_policy_step"]["values"])
    assert st["sampling"]["max_new_tokens"] == args.max_new_tokens


def test_memory_workers_figures_and_the_report(toy, generation, steps):
    args, _ = toy
    simpo = sampling.run_worker("simpo", "tiny", 0, args)
    sigmoid = sampling.run_worker("sigmoid", "tiny", 0, args)
    assert simpo["references"] == 0 and sigmoid["references"] == 1
    spawned = sampling.spawn_worker("simpo", "tiny", 1, args)  # the fresh process the benchmark runs
    spawned_sigmoid = sampling.spawn_worker("sigmoid", "tiny", 1, args)
    assert spawned["references"] == 0 and spawned["round"] == 1 and spawned["cuda_mb"] is None
    assert spawned_sigmoid["references"] == 1
    for rec in (simpo, sigmoid, spawned, spawned_sigmoid):
        assert 0 < rec["rss_start_mb"] <= rec["peak_rss_mb"] and 0 < rec["rss_after_build_mb"] <= rec["peak_rss_mb"]
        assert rec["policy_weights_mb"] == pytest.approx(simpo["policy_weights_mb"])

    # what a build adds is measured in the fresh processes, as the benchmark does: in this long-lived test process
    # the allocator reuses memory earlier tests freed, so a build can add nothing resident
    simpo, sigmoid = spawned, spawned_sigmoid
    m = sampling.aggregate_memory([simpo, sigmoid])
    assert m["simpo_has_no_reference"] is True
    assert m["loss_types"]["sigmoid"]["references"] == 1
    q = m["simpo_over_sigmoid_build_adds"]
    adds = [r["peak_rss_mb"] - r["rss_start_mb"] for r in (simpo, sigmoid)]
    assert q["median"] == pytest.approx(adds[0] / adds[1])
    assert q["target"] == "<= 0.6" and q["pass"] == (q["median"] <= 0.6)
    assert m["simpo_over_sigmoid_peak_rss"]["median"] == pytest.approx(simpo["peak_rss_mb"] / sigmoid["peak_rss_mb"])

    result = {"machine": {"device": "cpu", "cpu_model": "x", "cpu_count": 2, "torch_threads": 1, "dtype": "fp32",
                          "load_average_at_start": [0.0], "load_average_at_end": [0.0]},
              "settings": {k.replace("-", "_"): getattr(args, k.replace("-", "_")) for k in (
                  "prompts", "max_prompt_length", "temperature", "top_p", "max_new_tokens", "repeats", "pairs",
                  "steps", "warmup", "memory_rounds")} | {"generated_tokens": "x", "memory": "peak RSS"},
              "runs": {"tiny": {"generate": generation, "step": steps, "memory": m}}}
    table = "\n".join(report.sampling(result))
    assert "| tiny | simpo | 0 |" in table and "| tiny | sigmoid | 1 |" in table
    assert "simpo builds no reference model | yes" in table
    assert "| tiny | dynlab |" in table and "| tiny | plain |" in table and "| tiny (0.1M) |" in table
    assert "identical tokens greedy, identical tokens sampled" in table
