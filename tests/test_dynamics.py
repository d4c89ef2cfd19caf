"""The first-order decomposition on real (tiny) transformers: −η A K G against its SGD form, the forward-mode
prediction against autograd and against the observed change, gradient similarity, and DynamicsCallback in a fit."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from dynlab.cli import main
from dynlab.dynamics.influence import (
    directional_change,
    entk_decomposition,
    gradient_similarity,
    pack,
    predicted_and_observed,
    relative_error,
    response_logits,
    sequence_logps,
)
from dynlab.losses.dpo import dpo_loss
from dynlab.tracking.trajectory import add_step_columns, read_trajectory, write_step
from tests.conftest import CONFIGS

# token ids >= 2: id 1 is the tiny model's padding_idx, whose embedding row gets no gradient through the input path
OBSERVED = [([3, 4, 5], [6, 7, 8, 9])]
TRAIN = [([3, 4, 5], [10, 11, 12]), ([3, 4, 5], [13, 14])]


def small_vocab_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).double()


@pytest.fixture
def float64_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama's RMSNorm upcasts to float32 (a downcast for a float64 model); exact identities need float64 throughout."""
    def forward(self, hidden):
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def sft_loss_of(model, train):
    _, targets, _ = response_logits(model, train)
    return lambda z: -z.log_softmax(-1).gather(-1, targets[:, None]).sum()


def dpo_loss_of(model, train, beta=0.1):
    """DPO on (chosen = row 0, rejected = row 1) with a fixed reference, as a function of the response logits."""
    _, targets, seq_index = response_logits(model, train)
    ref = torch.tensor([-30.0, -20.0], dtype=torch.float64)

    def loss(z):
        token = z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        logps = torch.zeros(2, dtype=z.dtype).index_add(0, seq_index, token)
        return dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:], beta=beta)[0].sum()
    return loss


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_minus_eta_a_k_g_equals_the_sgd_form(loss, float64_norm):
    model = small_vocab_model()
    observed, train = pack(OBSERVED), pack(TRAIN)
    loss_of = (sft_loss_of if loss == "sft" else dpo_loss_of)(model, train)
    out = entk_decomposition(model, observed, train, loss_of, lr=0.1)
    m, v, n = 4, 32, 5
    assert out["A"].shape == (m, v, v) and out["K"].shape == (m, v, n, v) and out["G"].shape == (n, v)
    assert out["token"].shape == (m,)
    torch.testing.assert_close(out["predicted"], out["sgd"], rtol=1e-10, atol=1e-13)
    # the eNTK is a Gram matrix: K(χ_u, χ_u) is symmetric positive semi-definite
    train_kernel = entk_decomposition(model, train, train, loss_of, lr=0.1)["K"]
    flat = train_kernel.reshape(n * v, n * v)
    torch.testing.assert_close(flat, flat.T)
    assert torch.linalg.eigvalsh(flat).min() > -1e-8 * flat.abs().max()


def test_a_and_g_have_their_closed_forms(float64_norm):
    model = small_vocab_model()
    observed, train = pack(OBSERVED), pack(TRAIN)
    out = entk_decomposition(model, observed, train, sft_loss_of(model, train), lr=0.1)
    z_o, _, _ = response_logits(model, observed)
    z_u, targets, _ = response_logits(model, train)
    probs_o, probs_u = z_o.softmax(-1).detach(), z_u.softmax(-1).detach()
    # A_m = I − 1 π_mᵀ (each row is e_row − π_m); G = π − e_y for cross-entropy summed over tokens
    torch.testing.assert_close(out["A"][2], torch.eye(32, dtype=torch.float64) - probs_o[2][None, :])
    torch.testing.assert_close(out["G"], probs_u - torch.nn.functional.one_hot(targets, 32).double())


def test_entk_refuses_big_vocabularies(tiny_spec):
    from dynlab.models.load import load_model

    model = load_model(tiny_spec)
    with pytest.raises(ValueError, match="eNTK Jacobians would hold"):
        entk_decomposition(model, pack(OBSERVED), pack(TRAIN), lambda z: z.sum(), lr=0.1, max_elements=10**6)


def test_forward_mode_prediction_equals_autograd_inner_product(tiny_spec):
    from dynlab.models.load import load_model

    model = load_model(tiny_spec).double()
    batch = pack([([2, 5, 7, 9], [11, 12, 13]), ([2, 3], [40, 41, 42, 43, 44])])
    torch.manual_seed(1)
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    change = directional_change(model, batch, direction)
    for b in range(2):
        grads = torch.autograd.grad(sequence_logps(model, batch)[b], list(model.parameters()))
        expected = sum((g * direction[n]).sum() for g, (n, _) in zip(grads, model.named_parameters()))
        torch.testing.assert_close(change[b], expected, rtol=1e-6, atol=1e-8)


def test_prediction_error_shrinks_linearly_with_the_step(tiny_spec):
    from dynlab.models.load import load_model

    model = load_model(tiny_spec).double()
    batch = pack([([2, 5, 7, 9], [11, 12, 13]), ([2, 3], [40, 41, 42, 43, 44])])
    train = pack([([4, 5, 6], [7, 8, 9, 10])])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = torch.autograd.grad(-sequence_logps(model, train).sum(), list(model.parameters()))
    errors = []
    for lr in (1e-3, 1e-4):
        after = {n: before[n] - lr * g for (n, _), g in zip(model.named_parameters(), grads)}
        out = predicted_and_observed(model, batch, before, after)
        errors.append(relative_error(out["predicted"], out["observed"]))
    assert (errors[1] < 0.05).all()
    ratio = errors[0] / errors[1]  # error O(η²) over change O(η): ten times the step, ten times the error
    assert ((ratio > 5) & (ratio < 20)).all(), ratio  # linear; a second-order error would give ~100
    # the model's parameters are left as they were
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_gradient_similarity(tiny_spec):
    from dynlab.models.load import load_model

    model = load_model(tiny_spec)
    responses = {"a": [10, 11, 12], "same_as_a": [10, 11, 12], "b": [40, 41, 42, 43], "c": [7, 7, 7]}
    names, cosine = gradient_similarity(model, [2, 5, 6], responses)
    assert names == list(responses) and cosine.shape == (4, 4)
    torch.testing.assert_close(cosine, cosine.T)
    torch.testing.assert_close(cosine.diagonal(), torch.ones(4))
    assert cosine[0, 1] == pytest.approx(1.0, abs=1e-5) and abs(cosine[0, 2]) < 0.999
    # a parameter subset by regex, and a memory guard with the fix in its message
    _, last = gradient_similarity(model, [2, 5, 6], responses, params=r"layers\.1\.")
    assert not torch.allclose(last, cosine)
    with pytest.raises(ValueError, match="restrict it to fewer parameters"):
        gradient_similarity(model, [2, 5, 6], responses, max_bytes=1000)


def test_add_step_columns_merges_into_the_step_file(tmp_path: Path):
    write_step(tmp_path, 4, [{"split": "train", "type": t, "row": r, "logp": -float(r)}
                             for t in ("chosen", "rejected") for r in (0, 1)])
    add_step_columns(tmp_path, 4, [{"split": "train", "type": "chosen", "row": 1, "dyn_observed": 0.5}])
    add_step_columns(tmp_path, 4, [{"split": "train", "type": "chosen", "row": 1, "dyn_observed": 0.25}])  # replaces
    frame = read_trajectory(tmp_path)
    assert len(frame) == 4 and frame["logp"].notna().all()
    assert frame["dyn_observed"].tolist()[1] == 0.25 and frame["dyn_observed"].isna().sum() == 3


def test_dynamics_callback_in_a_fit(in_tmp: Path):
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
          "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.callbacks+=dynlab.dynamics.DynamicsCallback",
          "--trainer.callbacks.num_examples=2", "--trainer.callbacks.every_n_steps=2",
          "--model.init_args.probe_every_n_steps=2", "--model.init_args.optimizer.init_args.lr=1e-4"])
    run = next(in_tmp.glob("**/probes/trajectory")).parents[1]
    frame = read_trajectory(run)
    dyn = frame.dropna(subset=["dyn_observed"])
    # steps 0 and 2 measured (not 3: there is no next step), 2 rows x 11 types each
    assert sorted(dyn["step"].unique()) == [0, 2]
    assert len(dyn) == 2 * 2 * 11 and set(dyn["row"]) == {0, 1}
    assert dyn[["dyn_predicted", "dyn_predicted_sgd"]].notna().all().all()
    corr = dyn[["dyn_observed", "dyn_predicted"]].corr().iloc[0, 1]
    assert corr > 0.95, corr
    similarity = json.loads((run / "probes/dynamics/similarity_step_00000002.json").read_text())
    matrix = torch.tensor(similarity["matrix"])
    assert matrix.shape == (11, 11) and torch.allclose(matrix.diagonal(), torch.ones(11), atol=1e-5)
    figures = {p.name for p in (run / "figures").glob("*.png")}
    assert {"dynamics_predicted_vs_observed.png", "gradient_similarity.png"} <= figures
    # the unmeasured rows keep their probe metrics
    assert frame["logp"].notna().all() and isinstance(frame, pd.DataFrame)
