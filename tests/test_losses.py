"""Losses and log-probability helpers against hand-worked numbers and a float64 reference."""

import math

import pytest
import torch

from dynlab.losses import IGNORE_INDEX, dpo_loss, response_positions, segment_mean, segment_sum, sft_loss, token_logps
from dynlab.losses.dpo import DPOArgumentError, check_dpo_args

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
        ({"loss_type": "kto"}, "loss_type", "'sigmoid', 'ipo' or 'hinge'"),
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
