"""Probe statistics against a float64 reference, and the torchmetrics accumulators per batch, accumulated,
reset and under 2-process gloo DDP."""

import doctest
import math
import os
import socket
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dynlab.metrics.probe
from dynlab.metrics import (
    MEAN_METRICS,
    SEQUENCE_METRICS,
    SUM_METRICS,
    PreferenceMetric,
    ProbeTypeMetric,
    sequence_stats,
    token_stats,
)


def reference_token_stats(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every statistic from its definition, with the full softmax in float64 (and A built explicitly)."""
    z = logits.double()  # (N, V)
    n, vocab = z.shape
    pi = torch.softmax(z, -1)
    pi_y = pi[torch.arange(n), targets]
    max_prob = pi.max(-1).values
    a = torch.eye(vocab, dtype=torch.float64) - torch.ones(vocab, 1, dtype=torch.float64) * pi[:, None, :]  # (N, V, V)
    return {
        "logp": pi_y.log(),
        "argmax_logp": max_prob.log(),
        "except_argmax_logp": torch.log1p(-max_prob),
        "max_prob": max_prob,
        "peakiness": (pi**2).sum(-1),
        "entropy": -(pi * pi.log()).sum(-1),
        "a_norm": torch.linalg.matrix_norm(a),
        "p_e": torch.linalg.vector_norm(pi - torch.nn.functional.one_hot(targets, vocab), dim=-1),
        "energy": 1 - pi_y,
    }


def random_logits(n: int = 37, vocab: int = 50, scale: float = 3.0, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, vocab, generator=gen)).to(dtype), torch.randint(0, vocab, (n,), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_token_stats_match_float64_reference(dtype, chunk_size):
    logits, targets = random_logits(dtype=dtype)
    got = token_stats(logits, targets, chunk_size=chunk_size)
    want = reference_token_stats(logits, targets)  # from the same (bf16-rounded) logits
    assert set(got) == set(SEQUENCE_METRICS)
    for name in SEQUENCE_METRICS:
        assert got[name].dtype == torch.float32 and got[name].shape == (37,), name
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_token_stats_keep_relative_precision_over_a_real_vocabulary():
    # 49k columns (SmolLM2's vocabulary): sums over V in float32 must stay near float64; a dot-product reduction
    # (einsum) lost ~8e-5 relative on the entropy here, beyond what the probe benchmark's 1e-5 agreement allows
    logits, targets = random_logits(n=24, vocab=49152, scale=4.0, seed=1)
    targets[:4] = logits[:4].argmax(-1)  # near-1 pi_y: p_e must not come from a cancelling difference
    got = token_stats(logits, targets)
    z = logits.double()
    logpi = z.log_softmax(-1)
    pi = logpi.exp()
    # torch.log_softmax in float32 is 1.9e-5 off in absolute terms here (torch 2.13, CPU): peakiness was 3e-5 off
    want = {"entropy": -(pi * logpi).sum(-1), "peakiness": (pi * pi).sum(-1),
            "p_e": torch.linalg.vector_norm(pi - torch.nn.functional.one_hot(targets, 49152), dim=-1),
            "logp": logpi.gather(1, targets[:, None]).squeeze(1), "argmax_logp": logpi.max(-1).values,
            "except_argmax_logp": torch.log1p(-pi.max(-1).values)}
    for name, value in want.items():
        assert ((got[name].double() - value).abs() / value.abs()).max() < 2e-5, name


def test_token_stats_chunked_equals_unchunked():
    logits, targets = random_logits(n=50, dtype=torch.bfloat16, seed=3)
    chunked, whole = token_stats(logits, targets, chunk_size=8), token_stats(logits, targets)
    for name in SEQUENCE_METRICS:
        torch.testing.assert_close(chunked[name], whole[name], rtol=0, atol=0, msg=name)


def test_except_argmax_logp_finite_when_max_prob_rounds_to_one():
    logits = torch.tensor([[50.0, 0.0, 0.0, 0.0], [0.0, 0.0, 80.0, 0.0]])
    stats = token_stats(logits, torch.tensor([0, 1]))
    assert stats["max_prob"].tolist() == [1.0, 1.0]  # so log(1 - max_prob) would be -inf (the paper's NaN)
    # log(1 - pi_max) = log(3 e^0) - logsumexp(50, 0, 0, 0) = log 3 - 50 - log1p(3 e^-50)
    torch.testing.assert_close(stats["except_argmax_logp"][0], torch.tensor(-48.90138771133189))
    torch.testing.assert_close(stats["except_argmax_logp"][1], torch.tensor(math.log(3.0) - 80.0))
    assert torch.isfinite(torch.stack(list(stats.values()))).all()


def test_except_argmax_logp_keeps_relative_precision_when_max_prob_is_tiny():
    # near-uniform over 49k tokens: log(1 - max pi) ~ -max pi ~ -1.5e-4, which a float32 logsumexp off the argmax
    # resolves only to ~1e-7 absolute (3e-4 relative here); log1p(-max pi) in float64 keeps it
    logits = torch.zeros(3, 49152)
    logits[:, 7] = torch.tensor([2.0, 0.5, 0.0])
    got = token_stats(logits, torch.tensor([0, 1, 2]))["except_argmax_logp"].double()
    want = torch.log1p(-torch.softmax(logits.double(), -1).max(-1).values)
    assert ((got - want).abs() / want.abs()).max() < 1e-6


def test_uniform_and_one_hot_extremes():
    vocab = 10
    uniform = token_stats(torch.zeros(1, vocab), torch.tensor([3]))
    torch.testing.assert_close(uniform["a_norm"], torch.tensor([math.sqrt(vocab - 1)]))
    torch.testing.assert_close(uniform["peakiness"], torch.tensor([1 / vocab]))
    torch.testing.assert_close(uniform["entropy"], torch.tensor([math.log(vocab)]))
    torch.testing.assert_close(uniform["argmax_logp"], uniform["logp"])
    torch.testing.assert_close(uniform["except_argmax_logp"], torch.tensor([math.log(1 - 1 / vocab)]))

    one_hot = torch.zeros(2, vocab)
    one_hot[:, 4] = 1000.0  # pi = e_4 in float32
    peaked = token_stats(one_hot, torch.tensor([4, 7]))  # target on the peak, then off it
    torch.testing.assert_close(peaked["a_norm"], torch.full((2,), math.sqrt(2 * vocab - 2)))
    assert peaked["entropy"].tolist() == [0.0, 0.0] and peaked["max_prob"].tolist() == [1.0, 1.0]
    torch.testing.assert_close(peaked["p_e"], torch.tensor([0.0, math.sqrt(2)]))
    assert peaked["energy"].tolist() == [0.0, 1.0]


def test_masked_vocabulary_entropy_is_finite():
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]])  # 0 log 0 = 0
    stats = token_stats(logits, torch.tensor([0]))
    torch.testing.assert_close(stats["entropy"], torch.tensor([math.log(2.0)]))
    torch.testing.assert_close(stats["a_norm"], torch.tensor([math.sqrt(4 - 2 + 4 * 0.5)]))


def test_invariants_on_random_and_extreme_logits():
    for scale in (0.1, 3.0, 40.0):
        logits, targets = random_logits(n=64, vocab=30, scale=scale, seed=int(scale * 10))
        seq_index = torch.arange(64) // 16
        tok = token_stats(logits, targets)
        seq = sequence_stats(tok, seq_index, 4)
        assert (tok["argmax_logp"] >= tok["logp"]).all() and (seq["argmax_logp"] >= seq["logp"]).all()
        assert ((tok["energy"] >= 0) & (tok["energy"] <= 1)).all()
        assert ((tok["p_e"] >= 0) & (tok["p_e"] <= math.sqrt(2) + 1e-6)).all()
        assert ((tok["a_norm"] >= math.sqrt(29) - 1e-4) & (tok["a_norm"] <= math.sqrt(58) + 1e-4)).all()
        assert all(torch.isfinite(v).all() for v in tok.values())


def test_sequence_stats_sums_and_means():
    logits, targets = random_logits(n=6, vocab=8)
    seq_index = torch.tensor([0, 0, 0, 2, 2, 1])
    tok = token_stats(logits, targets)
    seq = sequence_stats(tok, seq_index, 4)  # sequence 3 has no tokens
    for name in SUM_METRICS:
        v = tok[name]
        torch.testing.assert_close(seq[name], torch.stack([v[:3].sum(), v[5], v[3:5].sum(), torch.tensor(0.0)]))
    for name in MEAN_METRICS:
        v = tok[name]
        torch.testing.assert_close(seq[name], torch.stack([v[:3].mean(), v[5], v[3:5].mean(), torch.tensor(0.0)]))
    with pytest.raises(ValueError, match="unknown token statistic"):
        sequence_stats({"perplexity": tok["logp"]}, seq_index, 4)


def test_paper_a_norm_matches_float64_reference():
    # the original code's A_o per sequence: sqrt(V * (mean_m ||pi_m||_2)^2 + V - 2), from the float64 softmax
    logits, targets = random_logits(n=9, vocab=40, scale=4.0, seed=5)
    seq_index = torch.tensor([0, 0, 0, 0, 1, 3, 3, 3, 3])  # sequence 2 has no tokens
    tok = token_stats(logits, targets)
    paper = sequence_stats(tok, seq_index, 4, a_norm="paper", vocab_size=40)
    ours = sequence_stats(tok, seq_index, 4)
    norms = torch.linalg.vector_norm(torch.softmax(logits.double(), -1), dim=-1)  # (N,) ||pi_m||_2
    want = [math.sqrt(40 * norms[rows].mean().item() ** 2 + 38) for rows in (slice(0, 4), slice(4, 5), slice(5, 9))]
    torch.testing.assert_close(paper["a_norm"][[0, 1, 3]].double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert paper["a_norm"][2].item() == 0.0  # no tokens: 0, like every metric (the original code gives NaN)
    # dynlab's mean of per-token norms is >= the paper's (Jensen), equal for a single token
    assert (ours["a_norm"][[0, 3]] > paper["a_norm"][[0, 3]]).all()
    torch.testing.assert_close(ours["a_norm"][1], paper["a_norm"][1])
    assert all(torch.equal(paper[k], ours[k]) for k in ours if k != "a_norm")
    with pytest.raises(ValueError, match="vocab_size"):
        sequence_stats(tok, seq_index, 4, a_norm="paper")
    with pytest.raises(ValueError, match="a_norm"):
        sequence_stats(tok, seq_index, 4, a_norm="mean")


def test_doctests():
    assert doctest.testmod(dynlab.metrics.probe).failed == 0


# --- ProbeTypeMetric -------------------------------------------------------------------------------------


def probe_batch(seed: int, batch: int = 5) -> dict[str, torch.Tensor]:
    """Per-sequence statistics of `batch` random probe responses of 1-4 tokens."""
    gen = torch.Generator().manual_seed(seed)
    seq_index = torch.randint(0, batch, (4 * batch,), generator=gen).sort().values
    logits, targets = random_logits(n=4 * batch, vocab=20, seed=seed)
    return sequence_stats(token_stats(logits, targets), seq_index, batch)


def test_probe_type_metric_is_the_mean_and_accumulates():
    stats = probe_batch(0, batch=8)
    dlogp = torch.linspace(-1, 1, 8)

    whole = ProbeTypeMetric()
    whole.update({**stats, "dlogp": dlogp})
    want = {name: v.mean() for name, v in {**stats, "dlogp": dlogp}.items()}
    got = whole.compute()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)

    split = ProbeTypeMetric()
    split.update({name: v[:3] for name, v in {**stats, "dlogp": dlogp}.items()})
    split.update({name: v[3:] for name, v in {**stats, "dlogp": dlogp}.items()})
    for name, value in split.compute().items():
        torch.testing.assert_close(value, got[name], msg=name)

    split.reset()
    split.update({name: v[:3] for name, v in stats.items()})  # dlogp is optional
    after_reset = split.compute()
    assert "dlogp" not in after_reset
    torch.testing.assert_close(after_reset["logp"], stats["logp"][:3].mean())


def test_probe_type_metric_dlogp_has_its_own_count():
    metric = ProbeTypeMetric(names=("logp", "dlogp"))
    metric.update({"logp": torch.tensor([-1.0, -2.0, -3.0])})
    metric.update({"logp": torch.tensor([-6.0]), "dlogp": torch.tensor([0.25])})
    out = metric.compute()
    assert out["logp"].item() == -3.0 and out["dlogp"].item() == 0.25


def test_probe_type_metric_rejects_bad_updates():
    metric = ProbeTypeMetric(names=("logp", "entropy"))
    with pytest.raises(ValueError, match=r"missing statistics \['entropy'\]"):
        metric.update({"logp": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unknown statistics \['energy'\]"):
        metric.update({"logp": torch.zeros(2), "entropy": torch.zeros(2), "energy": torch.zeros(2)})
    with pytest.raises(ValueError, match="one shape"):
        metric.update({"logp": torch.zeros(2), "entropy": torch.zeros(3)})
    with pytest.raises(ValueError, match="unique"):
        ProbeTypeMetric(names=("logp", "logp"))


def test_probe_type_metric_never_updated_is_empty():
    metric = ProbeTypeMetric()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns that compute ran before update
        assert metric.compute() == {}


def test_argmax_metrics_of_one_probe_type_are_not_overwritten_by_another():
    # the paper's code overwrote argmax/except-argmax/p_e/energy of every probe key with the last key's values
    chosen_stats, random_stats = probe_batch(1), probe_batch(2)
    chosen, random = ProbeTypeMetric(), ProbeTypeMetric()
    chosen.update(chosen_stats)
    before = chosen.compute()
    random.update(random_stats)
    after, other = chosen.compute(), random.compute()
    for name in ("argmax_logp", "except_argmax_logp", "p_e", "energy", "logp"):
        assert after[name] == before[name], name
        torch.testing.assert_close(after[name], chosen_stats[name].mean(), msg=name)
        torch.testing.assert_close(other[name], random_stats[name].mean(), msg=name)
        assert after[name] != other[name], name


# --- PreferenceMetric ------------------------------------------------------------------------------------


def test_preference_metric_hand_worked():
    metric = PreferenceMetric(beta=0.5)
    # margins 1, -1, 3; reference margins 0, 2, 4 -> rewards 0.5, -1.5, -0.5
    chosen, rejected = torch.tensor([-1.0, -4.0, -2.0]), torch.tensor([-2.0, -3.0, -5.0])
    chosen_ref, rejected_ref = torch.tensor([-2.0, -2.0, -1.0]), torch.tensor([-2.0, -4.0, -5.0])
    metric.update(chosen, rejected, chosen_ref, rejected_ref)
    out = metric.compute()
    torch.testing.assert_close(out["margin"], torch.tensor(1.0))
    torch.testing.assert_close(out["ranking_accuracy"], torch.tensor(2 / 3))
    torch.testing.assert_close(out["reward_margin"], torch.tensor(-0.5))
    torch.testing.assert_close(out["reward_accuracy"], torch.tensor(1 / 3))

    split = PreferenceMetric(beta=0.5)
    split.update(chosen[:1], rejected[:1], chosen_ref[:1], rejected_ref[:1])
    split.update(chosen[1:], rejected[1:], chosen_ref[1:], rejected_ref[1:])
    assert split.compute() == out

    split.reset()
    split.update(chosen[:2], rejected[:2])  # no reference: no reward keys
    assert set(split.compute()) == {"margin", "ranking_accuracy"}
    assert split.compute()["margin"].item() == 0.0


def test_preference_metric_rejects_bad_input():
    metric = PreferenceMetric()
    with pytest.raises(ValueError, match="both"):
        metric.update(torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="one shape"):
        metric.update(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="beta"):
        PreferenceMetric(beta=0.0)


# --- 2-process DDP -----------------------------------------------------------------------------------------


def _ddp_data() -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple[torch.Tensor, ...]]:
    stats = probe_batch(5, batch=8)
    gen = torch.Generator().manual_seed(6)
    dlogp = torch.randn(8, generator=gen)
    pairs = tuple(-10 * torch.rand(8, generator=gen) for _ in range(4))  # chosen, rejected, chosen_ref, rejected_ref
    return stats, dlogp, pairs


def _update_part(probe: ProbeTypeMetric, preference: PreferenceMetric, part: int) -> None:
    """Part 0 is rows 0-2 without dlogp, part 1 rows 3-7 with it (uneven on purpose)."""
    stats, dlogp, pairs = _ddp_data()
    rows = slice(0, 3) if part == 0 else slice(3, 8)
    probe.update({name: v[rows] for name, v in stats.items()} | ({"dlogp": dlogp[rows]} if part == 1 else {}))
    preference.update(*(p[rows] for p in pairs))


def _ddp_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        probe, preference = ProbeTypeMetric(), PreferenceMetric(beta=0.1)
        _update_part(probe, preference, rank)
        torch.save({"probe": probe.compute(), "preference": preference.compute()}, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    probe, preference = ProbeTypeMetric(), PreferenceMetric(beta=0.1)
    _update_part(probe, preference, 0)
    _update_part(probe, preference, 1)
    want = {"probe": probe.compute(), "preference": preference.compute()}
    assert set(want["probe"]) == set(SEQUENCE_METRICS) | {"dlogp"}
    assert set(want["preference"]) == {"margin", "ranking_accuracy", "reward_margin", "reward_accuracy"}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for group in want:
            assert set(got[group]) == set(want[group]), (rank, group)
            for name, value in want[group].items():
                torch.testing.assert_close(got[group][name], value, msg=f"rank {rank}: {group}/{name}")
