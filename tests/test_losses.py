"""Losses and log-probability helpers against hand-worked numbers and a float64 reference."""

import math

import pytest
import torch

from dynlab.losses import IGNORE_INDEX, dpo_loss, response_positions, segment_mean, segment_sum, sft_loss, token_logps
from dynlab.losses.dpo import LOSS_TYPES, DPOArgumentError, check_dpo_args

X = IGNORE_INDEX


def test_response_positions_hand_worked():
    labels = torch.tensor([[X, X, 5, 6, X], [X, 7, 8, 9, 2]])
    batch_idx, pos_idx, targets = response_positions(labels)
    # position t predicts labels[b, t + 1]; row-major order
    assert batch_idx.tolist() == [0, 0, 1, 1, 1, 1]
    assert pos_idx.tolist() == [1, 2, 0, 1, 2, 3]
    assert targets.tolist() == [5, 6, 7, 8, 9, 2]
    assert (labels[batch_idx, pos_idx + 1] == targets).all()


def test_response_positions_empty_row_and_bad_shape():
    batch_idx, pos_idx, targets = response_positions(torch.tensor([[X, X, X], [X, 3, X]]))
    assert batch_idx.tolist() == [1] and pos_idx.tolist() == [0] and targets.tolist() == [3]
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        response_positions(torch.tensor([1, 2, 3]))


def test_token_logps_hand_worked():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])  # pi = [1/4, 3/4] and [1/2, 1/2]
    out = token_logps(logits, torch.tensor([1, 0]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([math.log(0.75), math.log(0.5)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 64])
def test_token_logps_matches_float64_reference_with_gradient(dtype, chunk_size):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(13, 40, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(0, 40, (13,), generator=gen)
    weights = torch.randn(13, generator=gen)

    out = token_logps(logits, targets, chunk_size=chunk_size)
    (out * weights).sum().backward()

    ref_logits = logits.detach().double().requires_grad_()
    ref = torch.log_softmax(ref_logits, -1).gather(1, targets[:, None]).squeeze(1)
    (ref * weights.double()).sum().backward()

    assert out.dtype == torch.float32 and logits.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=1e-5)
    atol = 1e-6 if dtype == torch.float32 else 2e-2  # the gradient is returned in the logits' dtype
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-2, atol=atol)


def test_token_logps_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 50, generator=gen, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (37,), generator=gen)
    torch.testing.assert_close(token_logps(logits, targets, chunk_size=8), token_logps(logits, targets), rtol=0, atol=0)


def test_token_logps_rejects_bad_input():
    with pytest.raises(ValueError, match="targets"):
        token_logps(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), chunk_size=0)


def test_segment_sum_and_mean_hand_worked_and_differentiable():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    seq_index = torch.tensor([0, 0, 2, 2])
    assert segment_sum(values, seq_index, 3).tolist() == [3.0, 0.0, 7.0]
    means = segment_mean(values, seq_index, 3)
    assert means.tolist() == [1.5, 0.0, 3.5]  # sequence 1 has no tokens -> 0
    (means * torch.tensor([1.0, 5.0, 2.0])).sum().backward()
    assert values.grad.tolist() == [0.5, 0.5, 1.0, 1.0]


# pc = -1, pr = -3, rc = rr = -2, beta = 0.5: h = 2, beta * h = 1
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))


def test_dpo_sigmoid_hand_worked():
    pc = PC.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, PR, RC, RR, beta=0.5)
    # -logsigmoid(1) = log(1 + e^-1)
    torch.testing.assert_close(losses, torch.tensor([0.31326168751822286]))
    assert chosen_rewards.tolist() == [0.5] and rejected_rewards.tolist() == [-0.5]
    assert not chosen_rewards.requires_grad
    losses.sum().backward()
    # d loss / d pc = -beta * (1 - sigmoid(beta * h)) = -0.5 * sigmoid(-1)
    torch.testing.assert_close(pc.grad, torch.tensor([-0.5 / (1 + math.e)]))


def test_dpo_at_init_is_log2():
    logps = torch.tensor([-4.0, -9.0])
    losses, chosen_rewards, _ = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0)))
    assert chosen_rewards.tolist() == [0.0, 0.0]


def test_cdpo_label_smoothing_hand_worked():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.2)
    # 0.8 * log(1 + e^-1) + 0.2 * log(1 + e) = log(1 + e^-1) + 0.2, since log(1 + e) = 1 + log(1 + e^-1)
    torch.testing.assert_close(losses, torch.tensor([0.31326168751822286 + 0.2]))


def test_ipo_and_hinge_hand_worked():
    pc = torch.tensor([-1.0, -2.0, -3.0])  # with pr = rc = rr = -2: h = 1, 0, -1
    other = torch.full((3,), -2.0)
    ipo, _, _ = dpo_loss(pc, other, other, other, beta=0.5, loss_type="ipo")  # (h - 1)^2
    assert ipo.tolist() == [0.0, 1.0, 4.0]
    hinge, _, _ = dpo_loss(pc, other, other, other, beta=0.5, loss_type="hinge")  # relu(1 - h / 2)
    assert hinge.tolist() == [0.5, 1.0, 1.5]
    hinge, _, _ = dpo_loss(pc, other, other, other, beta=2.0, loss_type="hinge")  # relu(1 - 2h)
    assert hinge.tolist() == [0.0, 1.0, 3.0]


@pytest.mark.parametrize(
    ("kwargs", "argument", "match"),
    [
        ({"beta": 0.0}, "beta", "> 0"),
        ({"beta": float("inf")}, "beta", "finite"),
        ({"beta": float("nan")}, "beta", "> 0"),
        ({"label_smoothing": 0.5}, "label_smoothing", r"\[0, 0.5\)"),
        ({"label_smoothing": -0.1}, "label_smoothing", r"\[0, 0.5\)"),
        ({"label_smoothing": 0.1, "loss_type": "ipo"}, "label_smoothing", "only defined"),
        ({"loss_type": "kto"}, "loss_type", "must be one of 'sigmoid', 'ipo', 'hinge', 'slic'"),
        ({"delta": -1.0}, "delta", ">= 0"),
        ({"delta": float("inf")}, "delta", "finite"),
        ({"nll_weight": -0.1}, "nll_weight", ">= 0"),
        ({"nll_weight": float("nan")}, "nll_weight", ">= 0"),
        ({"dpop_lambda": -50.0}, "dpop_lambda", ">= 0"),
        ({"gamma": -0.5}, "gamma", ">= 0"),
        ({"label_smoothing": 0.1, "loss_type": "simpo"}, "label_smoothing", "only defined"),
    ],
)
def test_dpo_rejects_bad_arguments(kwargs, argument, match):
    # one check, shared by dpo_loss and DPOModule's constructor (which names the field from ``argument``)
    with pytest.raises(DPOArgumentError, match=match) as err:
        dpo_loss(PC, PR, RC, RR, **kwargs)
    assert err.value.argument == argument and isinstance(err.value, ValueError)
    with pytest.raises(DPOArgumentError, match=match):
        check_dpo_args(**{"beta": 0.1, **kwargs})


def test_dpo_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must all be"):
        dpo_loss(PC, torch.zeros(2), RC, RR)


# log(1 + e^-1) = -logsigmoid(1); log(1 + e) = 1 + log(1 + e^-1)
SOFTPLUS_M1 = 0.31326168751822286


def softplus(x: float) -> float:
    """log(1 + e^x) = -logsigmoid(-x), the closed form the hand-worked values below are written in."""
    return math.log1p(math.exp(x))


def grads(loss_type, pc, pr, rc, rr, **kwargs):
    """(loss (B,), d loss / d pc, d loss / d pr, d loss / d rc) by autograd."""
    pc, pr, rc = (t.clone().requires_grad_() for t in (pc, pr, rc))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, **kwargs)
    losses.sum().backward()
    return losses.detach(), pc.grad, pr.grad, rc.grad


def test_slic_hand_worked():
    two = torch.tensor([2.0])  # |y+| = 2: NLL(y+) = -pc / 2 = 0.5; h = 2 (PC, PR, RC, RR above)
    def loss(**kw):
        return dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="slic", chosen_lengths=two, **kw)[0].item()
    assert loss() == 0.5  # relu(1 - 2) + 1 * 0.5: the margin is met, only the NLL term is left
    assert loss(delta=3.0) == 1.5  # relu(3 - 2) + 0.5
    assert loss(delta=3.0, nll_weight=0.0) == 1.0
    assert loss(delta=3.0, nll_weight=4.0) == 3.0  # 1 + 4 * 0.5
    longer = dpo_loss(PC, PR, RC, RR, loss_type="slic", chosen_lengths=torch.tensor([4]), delta=3.0)[0]
    assert longer.item() == 1.25  # the NLL is a per-token mean: -(-1) / 4
    _, d_pc, d_pr, d_rc = grads("slic", PC, PR, RC, RR, chosen_lengths=two, delta=3.0)
    # hinge active (h < delta): d/dpc = -1 - 1 / |y+|, d/dpr = +1, d/drc = +1
    assert (d_pc.item(), d_pr.item(), d_rc.item()) == (-1.5, 1.0, 1.0)
    _, d_pc, d_pr, _ = grads("slic", PC, PR, RC, RR, chosen_lengths=two)  # hinge inactive: NLL gradient only
    assert (d_pc.item(), d_pr.item()) == (-0.5, 0.0)
    _, chosen_rewards, rejected_rewards = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="slic", chosen_lengths=two)
    assert chosen_rewards.tolist() == [0.5] and rejected_rewards.tolist() == [-0.5]  # beta * (policy - ref)


def test_sppo_hard_hand_worked():
    # r+ = pc - rc = 1, r- = pr - rr = -1; target +-1 / (2 beta)
    def loss(beta):
        return dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="sppo_hard")[0].item()
    assert loss(0.5) == 0.0  # targets +-1: met exactly
    assert loss(1.0) == 0.5  # (1 - 0.5)^2 + (-1 + 0.5)^2
    assert loss(0.25) == 2.0  # (1 - 2)^2 + (-1 + 2)^2
    _, d_pc, d_pr, d_rc = grads("sppo_hard", PC, PR, RC, RR, beta=1.0)
    # past the targets: 2 (1 - 0.5) = +1 pulls chosen back down, 2 (-1 + 0.5) = -1 pulls rejected back up
    assert (d_pc.item(), d_pr.item(), d_rc.item()) == (1.0, -1.0, -1.0)
    _, d_pc, d_pr, _ = grads("sppo_hard", PC, PR, RC, RR, beta=0.25)  # short of the targets: 2 (1 - 2), 2 (-1 + 2)
    assert (d_pc.item(), d_pr.item()) == (-2.0, 2.0)
    # the two log-ratios are regressed separately, not their difference: shifting both by +1 changes the loss
    assert dpo_loss(PC + 1, PR + 1, RC, RR, beta=0.5, loss_type="sppo_hard")[0].item() == 2.0  # 1 + 1


def test_dpop_hand_worked():
    # pc = -3, pr = -6, rc = rr = -2: h = 3, rc - pc = 1 (the policy lost probability on y+), beta = 0.5
    pc, pr, ref = torch.tensor([-3.0]), torch.tensor([-6.0]), torch.tensor([-2.0])
    def loss(lam):
        return dpo_loss(pc, pr, ref, ref, beta=0.5, loss_type="dpop", dpop_lambda=lam)[0].item()
    assert loss(0.0) == pytest.approx(softplus(-1.5))  # plain DPO: -logsigmoid(0.5 * 3)
    assert loss(1.0) == pytest.approx(SOFTPLUS_M1)  # -logsigmoid(0.5 * (3 - 1))
    assert loss(5.0) == pytest.approx(1 + SOFTPLUS_M1)  # -logsigmoid(0.5 * (3 - 5)) = log(1 + e)
    assert loss(50.0) == pytest.approx(23.5)  # the default: -logsigmoid(-23.5) = 23.5 + 6e-11
    # no penalty while pc >= rc (PC = -1 > RC = -2): DPOP is DPO
    dpop, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="dpop")
    torch.testing.assert_close(dpop, torch.tensor([SOFTPLUS_M1]))
    _, d_pc, d_pr, d_rc = grads("dpop", pc, pr, ref, ref, beta=0.5, dpop_lambda=5.0)
    # z = -1: d/dpc = -sigmoid(1) beta (1 + lambda) = -3 sigmoid(1); d/dpr = beta sigmoid(1); d/drc = +3 sigmoid(1)
    sig1 = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(torch.stack([d_pc, d_pr, d_rc]).squeeze(1), torch.tensor([-3 * sig1, 0.5 * sig1,
                                                                                          3 * sig1]))


def test_rpo_hand_worked():
    two = torch.tensor([2.0])
    def loss(**kw):
        return dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="rpo", **kw)[0].item()
    assert loss(chosen_lengths=two) == pytest.approx(SOFTPLUS_M1 + 0.5)  # DPO + 1 * (-(-1) / 2)
    assert loss(chosen_lengths=two, nll_weight=0.0) == pytest.approx(SOFTPLUS_M1)  # alpha = 0 is DPO
    assert loss(chosen_lengths=two, nll_weight=2.0) == pytest.approx(SOFTPLUS_M1 + 1.0)
    assert loss(chosen_lengths=torch.tensor([4])) == pytest.approx(SOFTPLUS_M1 + 0.25)
    _, d_pc, d_pr, _ = grads("rpo", PC, PR, RC, RR, beta=0.5, chosen_lengths=two, nll_weight=2.0)
    # DPO's -0.5 sigmoid(-1) plus alpha * (-1 / |y+|) = -1; the rejected side is DPO's alone
    torch.testing.assert_close(d_pc, torch.tensor([-0.5 / (1 + math.e) - 1.0]))
    torch.testing.assert_close(d_pr, torch.tensor([0.5 / (1 + math.e)]))


def test_simpo_hand_worked_and_reference_free():
    # pc = -1 over 2 tokens, pr = -3 over 3 tokens, beta = 2: z = 2 (-1/2) - 2 (-3/3) - gamma = 1 - gamma
    lengths = {"chosen_lengths": torch.tensor([2]), "rejected_lengths": torch.tensor([3])}
    def loss(**kw):
        return dpo_loss(PC, PR, None, None, loss_type="simpo", **{"beta": 2.0, **lengths, **kw})[0].item()
    assert loss(gamma=0.0) == pytest.approx(SOFTPLUS_M1)
    assert loss(gamma=2.0) == pytest.approx(1 + SOFTPLUS_M1)  # -logsigmoid(-1)
    assert loss() == pytest.approx(softplus(-0.5))  # default gamma 0.5
    assert loss(gamma=0.0, beta=1.0) == pytest.approx(softplus(-0.5))  # z = -0.5 + 1
    assert loss(gamma=0.0, rejected_lengths=torch.tensor([1])) == pytest.approx(softplus(-5.0))  # z = -1 + 6
    losses, chosen_rewards, rejected_rewards = dpo_loss(PC, PR, None, None, beta=2.0, loss_type="simpo", **lengths)
    assert chosen_rewards.tolist() == [-1.0] and rejected_rewards.tolist() == [-2.0]  # beta * logp / |y|
    assert not chosen_rewards.requires_grad
    # references, when given, are ignored
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta=2.0, loss_type="simpo", **lengths)[0], losses)
    _, d_pc, d_pr, d_rc = grads("simpo", PC, PR, RC, RR, beta=2.0, gamma=0.0, **lengths)
    # d/dpc = -sigmoid(-1) beta / |y+| = -1 / (1 + e); d/dpr = sigmoid(-1) beta / |y-| = (2/3) / (1 + e)
    torch.testing.assert_close(d_pc, torch.tensor([-1 / (1 + math.e)]))
    torch.testing.assert_close(d_pr, torch.tensor([2 / 3 / (1 + math.e)]))
    assert d_rc is None


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "simpo"])
def test_losses_with_a_reference_refuse_none(loss_type):
    lengths = {"chosen_lengths": torch.tensor([2]), "rejected_lengths": torch.tensor([3])}
    with pytest.raises(DPOArgumentError, match="ref_chosen_logps is None.*'simpo'") as err:
        dpo_loss(PC, PR, None, None, loss_type=loss_type, **lengths)
    assert err.value.argument == "ref_chosen_logps"
    with pytest.raises(DPOArgumentError, match="ref_rejected_logps is None"):
        dpo_loss(PC, PR, RC, None, loss_type=loss_type, **lengths)


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "argument", "match"),
    [
        ("slic", {}, "chosen_lengths", "required by loss_type 'slic'"),
        ("rpo", {}, "chosen_lengths", "required by loss_type 'rpo'"),
        ("simpo", {"chosen_lengths": torch.tensor([2])}, "rejected_lengths", "required by loss_type 'simpo'"),
        ("simpo", {"rejected_lengths": torch.tensor([2])}, "chosen_lengths", "required"),
        ("rpo", {"chosen_lengths": torch.tensor([0])}, "chosen_lengths", "at least 1"),
        ("rpo", {"chosen_lengths": torch.tensor([2, 3])}, "chosen_lengths", r"must be \(B,\)"),
    ],
)
def test_length_arguments_refused(loss_type, kwargs, argument, match):
    with pytest.raises(DPOArgumentError, match=match) as err:
        dpo_loss(PC, PR, RC, RR, loss_type=loss_type, **kwargs)
    assert err.value.argument == argument


def test_unknown_loss_type_lists_every_valid_one():
    with pytest.raises(DPOArgumentError) as err:
        check_dpo_args(0.1, 0.0, "kto")
    assert all(f"'{t}'" in str(err.value) for t in LOSS_TYPES) and len(LOSS_TYPES) == 8


def test_new_arguments_leave_the_old_losses_alone():
    # lengths and the new weights are read only by the losses that use them
    extra = {"chosen_lengths": torch.tensor([7]), "rejected_lengths": torch.tensor([9]), "delta": 5.0,
             "nll_weight": 3.0, "dpop_lambda": 1.0, "gamma": 2.0}
    for loss_type in ("sigmoid", "ipo", "hinge"):
        torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type=loss_type, **extra)[0],
                                   dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type=loss_type)[0])


def test_sft_loss_reductions_hand_worked():
    logps = torch.tensor([-1.0, -2.0, -3.0, -6.0], requires_grad=True)
    seq_index = torch.tensor([0, 0, 0, 2])  # sequence 1 has no response tokens
    assert sft_loss(logps).item() == 3.0
    assert sft_loss(logps, reduction="sum").item() == 12.0
    loss = sft_loss(logps, seq_index, 3, reduction="sequence_mean")  # mean(2, 6): the empty sequence is skipped
    assert loss.item() == 4.0
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([-1 / 6, -1 / 6, -1 / 6, -1 / 2]))


def test_sft_sequence_sum_is_the_papers_objective_hand_worked():
    # sequences 0, 1, 2 hold tokens {-1, -2}, {-3}, {-4}; sequence 3 has none (it still counts in B = 4)
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    seq_index = torch.tensor([0, 0, 1, 2])
    loss = sft_loss(logps, seq_index, 4, reduction="sequence_sum")  # (3 + 3 + 4 + 0) / 4
    assert loss.item() == 2.5
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.full((4,), -0.25))  # every token weighs 1/B
    # = token_mean (10 / 4 tokens here) times N / B, a factor that changes with the batch
    assert sft_loss(logps, seq_index, 2, reduction="sequence_sum").item() == 5.0
    assert sft_loss(logps, seq_index, 2, reduction="token_mean").item() == 2.5
    # the original code: losses = -(per_token_logps * loss_mask).sum(-1) per row, then losses.mean()
    per_token = torch.tensor([[-1.0, -2.0], [-3.0, 0.0], [-4.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert (-(per_token * mask).sum(-1)).mean().item() == 2.5
    with pytest.raises(ValueError, match="num_seqs"):
        sft_loss(logps, seq_index, reduction="sequence_sum")


def test_sft_loss_no_tokens_is_zero_and_errors():
    empty = torch.zeros(0, requires_grad=True)
    loss = sft_loss(empty)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="seq_index"):
        sft_loss(torch.zeros(3), reduction="sequence_mean")
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(torch.zeros(3), reduction="mean")


def test_losses_and_metrics_do_not_import_lightning():
    import subprocess
    import sys

    code = "import sys, dynlab.losses, dynlab.metrics; assert not {'lightning', 'pytorch_lightning'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
