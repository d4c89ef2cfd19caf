"""The two toys: the squeezing effect's analytic first-order facts on a linear softmax model, and Prop. 1
(Δlog π = −ηAKG + O(η²)) against real SGD steps of a small MLP on scikit-learn's 8×8 digits."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from dynlab.cli import main
from dynlab.dynamics.squeeze import (
    CASES,
    first_order_delta_logp,
    linear_step,
    negative_step_logits,
    predicted_risers,
    run_case,
    softmax,
    toy_weights,
)
from dynlab.errors import InputError

SEEDS = range(6)


def random_logits(seed: int, num_classes: int = 50) -> np.ndarray:
    """Flat to very peaky distributions: logits scaled by 0.3 … 8 depending on the seed."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(num_classes) * (0.3, 1.0, 2.0, 4.0, 6.0, 8.0)[seed % 6]


# ---------------------------------------------------------------- squeezing


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eta", [1e-4, 0.1, 1.0, 5.0])
def test_negative_step_lowers_label_and_raises_argmax(seed: int, eta: float):
    # exact for any η: Δz_i = ηπ_i is largest for y* among i ≠ ȳ and Δz_ȳ < 0, so every ratio π_j / π_{y*} shrinks
    z = random_logits(seed)
    before = softmax(z)
    for ybar in (int(before.argmax()), int(before.argmin()), 7):
        after = softmax(negative_step_logits(z, ybar, eta))
        ystar = int(np.argmax(np.where(np.arange(z.size) == ybar, -np.inf, before)))
        assert after[ybar] < before[ybar]
        assert after[ystar] > before[ystar]


@pytest.mark.parametrize("seed", SEEDS)
def test_first_order_formula(seed: int):
    z, ybar, eta = random_logits(seed), 3, 1e-6
    measured = np.log(softmax(negative_step_logits(z, ybar, eta))) - np.log(softmax(z))
    predicted = first_order_delta_logp(softmax(z), ybar, eta)
    np.testing.assert_allclose(measured, predicted, rtol=1e-4, atol=1e-14)
    assert predicted[ybar] <= -eta * (1 - softmax(z)[ybar]) ** 2  # the bound on the pushed-down label


@pytest.mark.parametrize("seed", SEEDS)
def test_rising_labels_are_those_above_the_threshold(seed: int):
    # {i ≠ ȳ : π_i > ‖π‖² − π_ȳ} exactly, for a small step, whatever ȳ is (peak, valley, in between)
    z = random_logits(seed)
    probs = softmax(z)
    for ybar in (int(probs.argmax()), int(probs.argmin()), int(np.argsort(probs)[-3]), 11):
        threshold = (probs**2).sum() - probs[ybar]
        assert np.abs(np.delete(probs, ybar) - threshold).min() > 1e-5  # no label within O(η) of the threshold
        rises = np.log(softmax(negative_step_logits(z, ybar, 1e-7))) > np.log(probs)
        np.testing.assert_array_equal(rises, predicted_risers(probs, ybar))
        ystar = int(np.argmax(np.where(np.arange(z.size) == ybar, -np.inf, probs)))
        assert rises[ystar] and not rises[ybar]


def test_squeezing_is_stronger_for_a_valley_label_and_a_peaky_distribution():
    weights = toy_weights()
    x, w_peaky = weights["peaky"]
    _, w_flat = weights["flat"]
    probs = softmax(x @ w_peaky)
    peak, valley = int(probs.argmax()), int(probs.argmin())

    def after(w: np.ndarray, label: int) -> np.ndarray:
        return softmax(x @ linear_step(w, x, minus=label, minus_lr=0.5))

    rise_valley = after(w_peaky, valley).max() - probs.max()
    rise_peak = after(w_peaky, peak).max() - probs.max()
    flat = softmax(x @ w_flat)
    rise_flat = after(w_flat, valley).max() - flat.max()
    assert rise_valley > 0.1 > rise_flat > 0 > rise_peak
    # the tail falls for a valley label (everything but y* falls), while a peak label spreads mass out
    assert (after(w_peaky, valley) < probs).sum() == probs.size - 1
    assert (after(w_peaky, peak) > probs).sum() == probs.size - 1
    # first order, the threshold ‖π‖² − π_ȳ is higher for a smaller π_ȳ: fewer labels rise
    assert predicted_risers(probs, valley).sum() < predicted_risers(probs, peak).sum()


def test_notebook_cases():
    weights = toy_weights(10086)
    results = {case.name: run_case(case, weights) for case in CASES}
    assert [c.name for c in CASES] == ["A", "B", "C", "C_peak", "D", "D_valley", "E"]
    assert int(results["C"][0].argmax()) == 8 and results["C"][0].max() == pytest.approx(0.7627, abs=1e-4)
    before, after = results["A"]  # the positive step pulls class 21 up to the top
    assert after[21] > before[21] and after.argmax() == 21
    for name in ("B", "C", "C_peak", "D_valley", "E"):  # negative steps: ȳ falls
        case = next(c for c in CASES if c.name == name)
        before, after = results[name]
        assert after[case.minus] < before[case.minus]
    before, after = results["E"]  # 1,000 classes: mass collapses onto the existing peak, tails drop 10+ decades
    assert after.argmax() == before.argmax() and after.max() > 0.999
    assert np.median(np.log10(before) - np.log10(after)) > 10
    # D: the π terms of the two steps cancel in logit space (Δz ∝ e_25 − e_42), so only class 25 moves up
    x, w = weights["peaky"]
    dz = x @ linear_step(w, x, minus=42, minus_lr=0.5, plus=25, plus_lr=0.5) - x @ w
    expected = np.zeros(50)
    expected[25], expected[42] = 0.5 * x @ x, -0.5 * x @ x
    np.testing.assert_allclose(dz, expected, atol=1e-12)


def test_squeeze_cli_writes_figures(tmp_path: Path, capsys: pytest.CaptureFixture):
    main(["toy", "squeeze", "--out", str(tmp_path / "sq")])
    printed = capsys.readouterr().out.split()
    pngs = sorted((tmp_path / "sq").glob("*.png"))
    assert {p.name for p in pngs} == {f"squeeze_{c.name}.png" for c in CASES} | {"squeeze_all.png"}
    assert all(str(p) in printed for p in pngs)
    assert all(matplotlib.image.imread(p).shape[0] > 200 for p in pngs)
    summary = json.loads((tmp_path / "sq" / "squeeze_summary.json").read_text())
    assert summary["cases"]["E"]["num_risen"] == 1
    assert summary["cases"]["B"]["num_risen"] == summary["cases"]["B"]["num_predicted_risers"]


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from dynlab.dynamics import digits as dg

    data = dg.load_digits_split(seed=0)
    model = dg.train_mlp(dg.make_mlp(32, seed=0), data.x_train, data.y_train, epochs=3, seed=0)
    x_u, y_u = data.x_train[1], int(data.y_train[1])
    x_obs = data.x_test[:300]
    return dg, model, x_obs, x_u, y_u, dg.decompose(model, x_obs, x_u, y_u)


def test_akg_matches_one_sgd_step_to_first_order(digits):
    dg, model, x_obs, x_u, y_u, dec = digits
    measured = dg.measured_delta_logp(model, x_obs, x_u, y_u, 1e-4)
    assert dg.relative_error(measured, dg.predicted_delta_logp(dec, 1e-4)) < 1e-3
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    errors = dg.error_vs_lr(model, x_obs, x_u, y_u, tuple(lrs), dec=dec)
    assert errors == sorted(errors)
    assert 0.8 <= dg.loglog_slope(lrs, errors) <= 1.2


def test_akg_is_the_sgd_inner_product(digits):
    # −ηAKG is −η⟨∇θ log π_c(x_o), ∇θ L_u⟩: the same number from plain autograd, no eNTK involved
    dg, model, x_obs, x_u, y_u, dec = digits
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x_u.unsqueeze(0)), torch.tensor([y_u]))
    grad_u = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    akg = torch.einsum("nij,njk,k->ni", dec.A, dec.K, dec.G)
    for o in (0, 17, 250):
        logp = model(x_obs[o : o + 1]).log_softmax(-1)[0]
        for c in range(10):
            grad_o = torch.cat([g.flatten() for g in torch.autograd.grad(logp[c], params, retain_graph=True)])
            assert float(grad_o @ grad_u) == pytest.approx(float(akg[o, c]), abs=1e-10, rel=1e-10)
    # and G, K are what they say: K(x, x) is a Gram matrix, G sums to zero
    k_self = dg.entk_product(model, x_u.unsqueeze(0), dg.jacobian(model, x_u.unsqueeze(0))[0].T)[0]
    assert torch.allclose(k_self, k_self.T) and torch.linalg.eigvalsh(k_self).min() > -1e-10
    assert abs(float(dec.G.sum())) < 1e-12


def test_digits_cli_writes_figures(tmp_path: Path, capsys: pytest.CaptureFixture):
    pytest.importorskip("sklearn")
    main(["toy", "digits", "--out", str(tmp_path / "dg"), "--epochs", "1", "--hidden", "16", "--per-class", "1",
          "--lrs", "1e-3", "1e-2", "1e-1"])
    names = {"digits_scatter.png", "digits_error_vs_lr.png", "digits_influence_heatmap.png", "digits_mean_softmax.png"}
    assert {p.name for p in (tmp_path / "dg").glob("*.png")} == names
    assert all(matplotlib.image.imread(tmp_path / "dg" / n).shape[0] > 200 for n in names)
    summary = json.loads((tmp_path / "dg" / "digits_summary.json").read_text())
    assert list(summary["relative_error"]) == ["0.001", "0.01", "0.1"]
    assert 0.8 <= summary["loglog_slope"] <= 1.2
    assert np.array(summary["influence_heatmap"]["values"]).shape == (10, 10)
    assert str(tmp_path / "dg" / "digits_summary.json") in capsys.readouterr().out


def test_digits_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("sklearn")
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "digits", "--out", str(tmp_path), "--example", "5000"])
    assert exit_info.value.code == 2 and "--example" in capsys.readouterr().err
    from dynlab.dynamics.digits import load_digits_split

    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)  # as if scikit-learn were missing
    with pytest.raises(InputError, match=r"pip install 'dynlab\[toys\]'"):
        load_digits_split()
