"""The sign errors preference losses ship with: gradient signs of every loss type at random points, and one SGD step
on the tiny model moving log pi(y+) and the margin the way each loss says, to first order."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama import modeling_llama

from dynlab.dynamics.influence import pack, sequence_logps
from dynlab.losses.dpo import LOSS_TYPES, dpo_loss
from dynlab.models.load import ModelSpec, load_model, load_tokenizer

# ---- (1) gradient signs at random points ----------------------------------------------------------------------------

B = 256


def random_point(seed: int) -> dict[str, torch.Tensor]:
    """B random (pc, pr, rc, rr) log-probabilities, lengths and a beta: margins h of both signs and every size."""
    gen = torch.Generator().manual_seed(seed)
    logps = -40 * torch.rand(4, B, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, 30, (2, B), generator=gen)
    beta = [0.05, 0.1, 0.5, 2.0][seed % 4]
    return {"pc": logps[0], "pr": logps[1], "rc": logps[2], "rr": logps[3], "len_c": lengths[0],
            "len_r": lengths[1], "beta": beta}


def expected_signs(loss_type: str, p: dict) -> tuple[dict[str, torch.Tensor], bool]:
    """Where each gradient must be strictly signed ({"pc", "pr", "rc"} -> (B,) mask), and whether the loss is a
    regression (ipo, sppo_hard): short of its target it pushes pc up and pr down like the others, past it back."""
    h = (p["pc"] - p["pr"]) - (p["rc"] - p["rr"])
    everywhere = torch.ones(B, dtype=torch.bool)
    target = 1 / (2 * p["beta"])
    if loss_type == "ipo":
        below = h < target
        return {"pc": below, "pr": below, "rc": below}, True
    if loss_type == "sppo_hard":
        chosen_below, rejected_above = p["pc"] - p["rc"] < target, p["pr"] - p["rr"] > -target
        return {"pc": chosen_below, "pr": rejected_above, "rc": chosen_below}, True
    if loss_type == "hinge":
        active = p["beta"] * h < 1
        return {"pc": active, "pr": active, "rc": active}, False
    if loss_type == "slic":
        active = h < 1.0  # delta; the NLL term keeps d/dpc < 0 everywhere
        return {"pc": everywhere, "pr": active, "rc": active}, False
    return {"pc": everywhere, "pr": everywhere, "rc": everywhere}, False


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("seed", range(4))
def test_gradient_signs(loss_type, seed):
    p = random_point(seed)
    pc, pr, rc = (p[k].clone().requires_grad_() for k in ("pc", "pr", "rc"))
    losses, _, _ = dpo_loss(pc, pr, rc, p["rr"], beta=p["beta"], loss_type=loss_type, chosen_lengths=p["len_c"],
                            rejected_lengths=p["len_r"])
    losses.sum().backward()  # pair b's loss depends on row b alone: the gradients are per-pair derivatives
    strict, regression = expected_signs(loss_type, p)
    # -1 where the loss must push down (d loss / d x > 0), +1 where up; d/drc has d/dpc's opposite sign
    for name, grad, up in (("pc", pc.grad, True), ("pr", pr.grad, False), ("rc", rc.grad, False)):
        if name == "rc" and loss_type == "simpo":
            assert grad is None  # reference-free: the reference does not enter
            continue
        sign = -1 if up else 1  # sign of the gradient where the loss is active
        inside, outside = grad[strict[name]], grad[~strict[name]]
        assert (sign * inside > 0).all(), f"{loss_type}: d loss / d {name} has the wrong sign where active"
        if regression:  # past the target the loss pulls back: the opposite sign (or 0 at the target)
            assert (sign * outside <= 0).all(), f"{loss_type}: d loss / d {name} does not pull back past the target"
        else:  # an inactive hinge contributes nothing, never the wrong sign
            assert (sign * outside >= 0).all(), f"{loss_type}: d loss / d {name} has the wrong sign where inactive"
    if loss_type in ("ipo", "sppo_hard", "hinge", "slic"):  # the random points reach both regions of the gradient
        assert strict["pr"].any() and (~strict["pr"]).any()
    if loss_type == "dpop":  # and both sides of DPOP's penalty
        assert (p["rc"] > p["pc"]).any() and (p["rc"] < p["pc"]).any()


# ---- (2) one SGD step on the tiny model -----------------------------------------------------------------------------

ETA = 1e-3


@pytest.fixture(scope="module")
def setup():
    """A float64 tiny model (the policy), its frozen copy (the reference) and one packed (y+, y-) pair."""
    def rms_norm(self, hidden):  # Llama's RMSNorm upcasts to float32 (a downcast here): keep float64 throughout
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
        spec = ModelSpec(name_or_path="tiny")
        tok = load_tokenizer(spec)
        policy = load_model(spec).double().eval()
        reference = copy.deepcopy(policy).requires_grad_(False)
        prompt = tok("Question: what is two plus two? Answer:")["input_ids"]
        chosen, rejected = tok(" four, of course.")["input_ids"], tok(" banana bread")["input_ids"]
        batch = pack([(prompt, chosen), (prompt, rejected)], pad_id=tok.pad_token_id)
        lengths = torch.tensor([len(chosen)]), torch.tensor([len(rejected)])
        yield policy, reference, batch, lengths


def logps(model, batch):
    """(pc, pr) of the pair: (1,), (1,)."""
    out = sequence_logps(model, batch)
    return out[:1], out[1:]


def flat_grad(scalar, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params, retain_graph=True)])


def one_step(policy, reference, batch, lengths, loss_type, eta=ETA, **kwargs):
    """One SGD step (learning rate ``eta``) of ``loss_type`` from the policy's weights (restored afterwards).

    Returns the pc, pr before and after, the reference's rc, rr, and the first-order prediction of Δpc:
    eta * (-dL/dpc <g+, g+> - dL/dpr <g+, g->), g± = ∇θ log pi(y±).
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        rc, rr = logps(reference, batch)
    pc, pr = logps(policy, batch)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, chosen_lengths=lengths[0],
                            rejected_lengths=lengths[1], **kwargs)
    d_pc, d_pr = torch.autograd.grad(losses.sum(), (pc, pr), retain_graph=True)
    g_c, g_r = flat_grad(pc.sum(), params), flat_grad(pr.sum(), params)
    predicted = eta * (-d_pc * (g_c @ g_c) - d_pr * (g_c @ g_r))
    grads = torch.autograd.grad(losses.sum(), params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= eta * g
        pc_after, pr_after = logps(policy, batch)
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return {"pc": pc.detach(), "pr": pr.detach(), "rc": rc, "rr": rr, "pc_after": pc_after, "pr_after": pr_after,
            "predicted": predicted, "g_c_sq": g_c @ g_c}


def margin(out, lengths, loss_type, after):
    pc, pr = (out["pc_after"], out["pr_after"]) if after else (out["pc"], out["pr"])
    if loss_type == "simpo":
        return pc / lengths[0] - pr / lengths[1]  # SimPO's length-normalised margin
    return (pc - pr) - (out["rc"] - out["rr"])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_step_from_the_reference_raises_the_margin(setup, loss_type):
    policy, reference, batch, lengths = setup
    out = one_step(policy, reference, batch, lengths, loss_type, beta=0.1)
    if loss_type != "simpo":
        assert margin(out, lengths, loss_type, after=False).abs().item() < 1e-12  # policy = reference: h = 0
    before, after = margin(out, lengths, loss_type, False), margin(out, lengths, loss_type, True)
    assert after.item() > before.item(), f"{loss_type}: one step lowered the margin"


def test_sft_terms_raise_log_pi_chosen_more_than_dpo(setup):
    """rpo and slic add nll_weight * NLL(y+): to first order Δpc gains eta * nll_weight / |y+| * ||g+||^2 > 0."""
    policy, reference, batch, lengths = setup
    sigmoid = one_step(policy, reference, batch, lengths, "sigmoid", beta=0.1)
    delta_sigmoid = sigmoid["pc_after"] - sigmoid["pc"]
    for loss_type, weight in (("rpo", 1.0), ("slic", 10.0)):
        out = one_step(policy, reference, batch, lengths, loss_type, beta=0.1, nll_weight=weight)
        delta = out["pc_after"] - out["pc"]
        assert delta.item() > delta_sigmoid.item(), loss_type
    # rpo is DPO plus the NLL term, so the difference is that term's first-order share (up to second order)
    rpo = one_step(policy, reference, batch, lengths, "rpo", beta=0.1, nll_weight=1.0)
    gain = (rpo["pc_after"] - rpo["pc"]) - delta_sigmoid
    torch.testing.assert_close(gain.squeeze(), ETA / lengths[0].item() * sigmoid["g_c_sq"], rtol=0.05, atol=0)


def test_dpop_raises_log_pi_chosen_more_than_dpo_when_it_fell(setup):
    """With rc > pc (a reference that first learned y+ by three SFT steps) DPOP's penalty is on: d/dpc gains
    -beta * lambda * sigmoid(-z), so Δpc exceeds DPO's on the same pair and step."""
    policy, _, batch, lengths = setup
    reference = copy.deepcopy(policy)
    params = list(reference.parameters())
    for _ in range(3):
        grads = torch.autograd.grad(-logps(reference, batch)[0].sum(), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.05 * g
    reference.requires_grad_(False)
    sigmoid = one_step(policy, reference, batch, lengths, "sigmoid", beta=0.1)
    dpop = one_step(policy, reference, batch, lengths, "dpop", beta=0.1)
    assert (dpop["rc"] - dpop["pc"]).item() > 0  # the penalty is active
    assert (dpop["pc_after"] - dpop["pc"]).item() > (sigmoid["pc_after"] - sigmoid["pc"]).item()
    assert (dpop["pc_after"] - dpop["pc"]).item() > 0  # and y+ gains probability outright


# at h = 0, |d loss / d pc| is beta / 2 = 0.05 for sigmoid and 1 / beta = 10 for sppo_hard: eta / 200 for sppo_hard
# gives both the same first-order step
@pytest.mark.parametrize(("loss_type", "eta"), [("sigmoid", ETA), ("sppo_hard", ETA / 200)])
def test_first_order_prediction_matches_one_step(setup, loss_type, eta):
    """Predicted eta * (-dL/dpc <g+, g+> - dL/dpr <g+, g->) against the observed Δ log pi(y+).

    They differ by the second-order remainder O(eta^2), under 1 % at this eta; halving eta must cut the absolute
    error by about 4 (> 3 asserted), which shows the gap is that remainder and not a sign or factor error (a wrong
    factor would leave a gap proportional to eta, cut by 2).
    """
    policy, reference, batch, lengths = setup
    errors = []
    for step in (eta, eta / 2):
        out = one_step(policy, reference, batch, lengths, loss_type, eta=step, beta=0.1)
        observed = out["pc_after"] - out["pc"]
        assert torch.sign(out["predicted"]) == torch.sign(observed) != 0
        torch.testing.assert_close(observed, out["predicted"], rtol=0.01, atol=0)
        errors.append((observed - out["predicted"]).abs().item())
    assert errors[0] / errors[1] > 3
