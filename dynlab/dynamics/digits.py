"""Prop. 1 checked exactly on scikit-learn's bundled 8×8 digits: after one SGD step on one training example u,
the measured Δlog π on every test example against −η A K G with the exact 10×10 eNTK, plus a Fig.-1-style
class-by-class influence heatmap.

    dynlab toy digits --out figures/digits [--example 0] [--epochs 10]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from dynlab.errors import InputError

NUM_CLASSES = 10
DEFAULT_LRS = tuple(float(v) for v in np.logspace(-4, -1, 7))  # 1e-4 … 1e-1, half a decade apart


@dataclass
class DigitsData:
    """The 8×8 digits split once: pixels scaled to [0, 1], float64. x (N, 64), y (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(num_train: int = 1000, seed: int = 0) -> DigitsData:
    """scikit-learn's 1,797 bundled digits (no download), shuffled with ``seed``: the first ``num_train`` for
    training, the rest (797 by default) for testing."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise InputError("the digits toy needs scikit-learn: pip install 'dynlab[toys]'") from err
    x, y = load_digits(return_X_y=True)
    if not 0 < num_train < len(y):
        raise InputError(f"num_train must be in [1, {len(y) - 1}], got {num_train}", field="num_train")
    order = np.random.RandomState(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float64)
    y = torch.tensor(y[order], dtype=torch.long)
    return DigitsData(x[:num_train], y[:num_train], x[num_train:], y[num_train:])


def make_mlp(hidden: int = 64, seed: int = 0) -> nn.Sequential:
    """64 -> hidden -> tanh -> 10 in float64: smooth (so the remainder is O(η²), no ReLU kinks) and precise enough
    to resolve a Δlog π of 1e-4 to many digits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, NUM_CLASSES)).double()


def train_mlp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, lr: float = 0.05,
              momentum: float = 0.9, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Plain minibatch SGD with momentum on cross-entropy (the paper's MNIST recipe, shortened). x (N, 64), y (N,)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """x (N, 64), y (N,) -> fraction classified correctly."""
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def jacobian(model: nn.Module, x: torch.Tensor, chunk: int = 200) -> torch.Tensor:
    """∇_θ z(x) for every input, exactly (torch.func.jacrev), parameters flattened in ``named_parameters`` order.

    x (N, D) -> J (N, V, P). Callers with many inputs should go through :func:`entk_product` instead (memory).
    """
    params = _params(model)

    def logits(p: dict[str, torch.Tensor], x1: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x1.unsqueeze(0),)).squeeze(0)  # (V,)

    out = []
    for xc in x.split(chunk):
        jac = vmap(jacrev(logits), in_dims=(None, 0))(params, xc)  # name -> (n, V, *shape)
        out.append(torch.cat([j.reshape(len(xc), NUM_CLASSES, -1) for j in jac.values()], dim=-1))
    return torch.cat(out)


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_θ L(x_u, y_u) of the cross-entropy for each example, flattened like :func:`jacobian`: x (M, D), y (M,)
    -> (M, P). Equal to J_uᵀ G_u with G_u = π(x_u) − e_{y_u}."""
    params = _params(model)

    def loss(p: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x1.unsqueeze(0),)), y1.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([v.reshape(len(y), -1) for v in g.values()], dim=-1)


def entk_product(model: nn.Module, x_obs: torch.Tensor, right: torch.Tensor, chunk: int = 200) -> torch.Tensor:
    """J_o R for every observed input, without holding all of J_o at once: x_obs (N, D), R (P, M) -> (N, V, M).
    With R = J_uᵀ (P, V) this is the eNTK K(x_o, x_u) (N, V, V); with R = ∇_θ L_u (P, M) it is K G per u."""
    return torch.cat([torch.einsum("nvp,pm->nvm", jacobian(model, xc, chunk), right) for xc in x_obs.split(chunk)])


@dataclass
class Decomposition:
    """The terms of Prop. 1 for one training example u and N observed inputs."""

    A: torch.Tensor  # (N, V, V) I − 1πᵀ at x_o
    K: torch.Tensor  # (N, V, V) eNTK J_o J_uᵀ
    G: torch.Tensor  # (V,) π(x_u) − e_{y_u}
    probs: torch.Tensor  # (N, V) π(x_o)


def decompose(model: nn.Module, x_obs: torch.Tensor, x_u: torch.Tensor, y_u: int) -> Decomposition:
    """A, K, G of Δlog π(x_o) = −η A(x_o) K(x_o, x_u) G(x_u, y_u) + O(η²): x_obs (N, D), x_u (D,)."""
    with torch.no_grad():
        probs = model(x_obs).softmax(-1)  # (N, V)
        g_u = model(x_u.unsqueeze(0)).softmax(-1).squeeze(0) - nn.functional.one_hot(
            torch.tensor(y_u), NUM_CLASSES).double()
    eye = torch.eye(NUM_CLASSES, dtype=probs.dtype)
    a = eye - probs.unsqueeze(1)  # (N, V, V): row i of I − 1πᵀ is e_i − π
    k = entk_product(model, x_obs, jacobian(model, x_u.unsqueeze(0))[0].T)
    return Decomposition(a, k, g_u, probs)


def predicted_delta_logp(dec: Decomposition, lr: float) -> torch.Tensor:
    """−η A K G: (N, V)."""
    return -lr * torch.einsum("nij,njk,k->ni", dec.A, dec.K, dec.G)


def measured_delta_logp(model: nn.Module, x_obs: torch.Tensor, x_u: torch.Tensor, y_u: int,
                        lr: float) -> torch.Tensor:
    """log π(·|x_o) after minus before one plain SGD step θ ← θ − η ∇_θ L(x_u, y_u) (no momentum, no weight decay);
    the model itself is left unchanged. x_obs (N, D), x_u (D,) -> (N, V)."""
    params = _params(model)
    g = loss_gradient(model, x_u.unsqueeze(0), torch.tensor([y_u]))[0]
    stepped, offset = {}, 0
    for name, p in params.items():
        stepped[name] = p - lr * g[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    with torch.no_grad():
        before = functional_call(model, params, (x_obs,)).log_softmax(-1)
        after = functional_call(model, stepped, (x_obs,)).log_softmax(-1)
    return after - before


def relative_error(measured: torch.Tensor, predicted: torch.Tensor) -> float:
    """‖measured − predicted‖ / ‖measured‖ over every entry (all test examples, all classes)."""
    return float(torch.linalg.norm(measured - predicted) / torch.linalg.norm(measured))


def error_vs_lr(model: nn.Module, x_obs: torch.Tensor, x_u: torch.Tensor, y_u: int,
                lrs: tuple[float, ...] = DEFAULT_LRS, dec: Decomposition | None = None) -> list[float]:
    """The relative error of −ηAKG against one real SGD step, for each learning rate."""
    dec = dec if dec is not None else decompose(model, x_obs, x_u, y_u)
    return [relative_error(measured_delta_logp(model, x_obs, x_u, y_u, lr), predicted_delta_logp(dec, lr))
            for lr in lrs]


def loglog_slope(lrs: tuple[float, ...] | list[float], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(η): 1 when the error is O(η²) on an O(η) change."""
    return float(np.polyfit(np.log(lrs), np.log(errors), 1)[0])


def class_influence(model: nn.Module, data: DigitsData, per_class: int = 5) -> torch.Tensor:
    """Class-by-class first-order influence (Fig. 1 style), per unit learning rate.

    Entry [c, c'] = mean over the first ``per_class`` training examples u of class c and over the test examples o
    of true class c' of −[A(x_o) K(x_o, x_u) G(x_u)]_{c'}, i.e. lim_{η→0} Δlog π(y_o = c' | x_o) / η: how one SGD
    step on a c changes the log-probability that test c's' keep on their own label. -> (V, V).
    """
    picks = torch.cat([torch.nonzero(data.y_train == c).flatten()[:per_class] for c in range(NUM_CLASSES)])
    g = loss_gradient(model, data.x_train[picks], data.y_train[picks])  # (M, P): J_uᵀ G_u for each u
    kg = entk_product(model, data.x_test, g.T)  # (N, V, M)
    with torch.no_grad():
        probs = model(data.x_test).softmax(-1)  # (N, V)
    akg = kg - torch.einsum("nv,nvm->nm", probs, kg).unsqueeze(1)  # (A v)_i = v_i − πᵀv
    own = -akg[torch.arange(len(data.y_test)), data.y_test]  # (N, M): change of each test example's true label
    heat = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=own.dtype)
    for c in range(NUM_CLASSES):
        rows = own[:, data.y_train[picks] == c]  # (N, per_class)
        for c2 in range(NUM_CLASSES):
            heat[c, c2] = rows[data.y_test == c2].mean()
    return heat


def mean_softmax_by_class(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean π over the test examples of each true class (the paper's Fig. 1): row = true class. -> (V, V)."""
    with torch.no_grad():
        probs = model(x).softmax(-1)
    return torch.stack([probs[y == c].mean(0) for c in range(NUM_CLASSES)])


def _plots(out: Path, *, data: DigitsData, example: int, y_u: int, lrs: tuple[float, ...], errors: list[float],
           slope: float, pairs: list[tuple[float, torch.Tensor, torch.Tensor]], heat: torch.Tensor,
           mean_probs: torch.Tensor, per_class: int) -> list[Path]:
    import matplotlib.pyplot as plt

    from dynlab.tracking.plots import save_figure  # selects the Agg backend

    written = []
    # (1) measured against predicted, one panel per learning rate, and the updated example
    fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(4.6 * len(pairs) + 2.6, 4.4),
                             gridspec_kw={"width_ratios": [1] * len(pairs) + [0.55]})
    for ax, (lr, measured, predicted) in zip(axes, pairs):
        # divided by η so that panels of different η share a scale and only the O(η²) remainder differs
        m, p = (measured / lr).flatten().numpy(), (predicted / lr).flatten().numpy()
        lim = float(np.abs(np.concatenate([m, p])).max()) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8, label="y = x")
        ax.scatter(p, m, s=4, alpha=0.4, color="tab:blue", label="(test example, class)")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="predicted −AKG  (= −ηAKG / η)",
               ylabel="measured Δlog π / η",
               title=f"η = {lr:g}: relative error {relative_error(measured, predicted):.2e}")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    axes[-1].imshow(data.x_train[example].view(8, 8).numpy(), cmap="gray_r")
    axes[-1].set(title=f"updated example u\n(train #{example}, label {y_u})", xticks=[], yticks=[])
    fig.suptitle(f"One SGD step on train #{example}: Δlog π(·|x_o) on all {len(data.y_test)} test digits")
    written.append(save_figure(fig, out / "digits_scatter.png"))

    # (2) relative error against η on log-log axes, with the fitted line
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.loglog(lrs, errors, "o-", label="‖measured − predicted‖ / ‖measured‖")
    fit = np.exp(np.polyval(np.polyfit(np.log(lrs), np.log(errors), 1), np.log(lrs)))
    ax.loglog(lrs, fit, "--", color="tab:red", label=f"fit: slope {slope:.3f}")
    ax.set(xlabel="learning rate η", ylabel="relative error of −ηAKG",
           title="First-order decomposition: error vanishes linearly in η")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which="both")
    written.append(save_figure(fig, out / "digits_error_vs_lr.png"))

    # (3) class-by-class influence. Rows differ by orders of magnitude (well-fit training examples have a tiny G), so
    # each row is scaled by its largest |entry|, written beside the row label; the JSON keeps the raw values
    fig, ax = plt.subplots(figsize=(7.2, 6.0))
    h = heat.numpy()
    scale = np.abs(h).max(axis=1, keepdims=True)
    im = ax.imshow(h / scale, cmap="RdBu_r", vmin=-1, vmax=1)
    for (i, j), v in np.ndenumerate(h / scale):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5)
    ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="test examples of true class c′",
           ylabel="class c of the updated training example (row scale)",
           title=f"Influence of one SGD step on a training c on test c′s: mean Δlog π(c′|x_o)/η\n"
                 f"(first order −AKG, {per_class} training examples per row, each row / its max |entry|)")
    ax.set_yticklabels([f"{c} (×{scale[c, 0]:.2g})" for c in range(NUM_CLASSES)])
    ax.title.set_fontsize(9)
    fig.colorbar(im, ax=ax, label="Δlog π(true label) / η, relative to the row's max |entry|")
    written.append(save_figure(fig, out / "digits_influence_heatmap.png"))

    # (4) the paper's Fig. 1: mean softmax per true class, as a heatmap and as bars for 4 and 9
    from matplotlib.colors import LogNorm

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
    mp = mean_probs.numpy()
    im = ax.imshow(mp, cmap="viridis", norm=LogNorm(vmin=max(mp.min(), 1e-6), vmax=1))
    ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="predicted class",
           ylabel="true class of the test digits", title="Mean π(· | x_o) per true class (log colour)")
    fig.colorbar(im, ax=ax)
    # the paper's pair is 4 ↔ 9 on MNIST; on 8×8 digits show whichever pair shares the most mass
    off = mp + mp.T
    np.fill_diagonal(off, -1)
    pair = np.unravel_index(off.argmax(), off.shape)
    width = 0.4
    for k, (c, colour) in enumerate(zip(pair, ("tab:blue", "tab:orange"))):
        bx.bar(np.arange(NUM_CLASSES) + (k - 0.5) * width, mp[c], width, color=colour, label=f"test digits '{c}'")
    bx.set(yscale="log", xticks=range(NUM_CLASSES), xlabel="class", ylabel="mean π (log scale)",
           title=f"The most confused pair keeps mutual mass ({pair[0]} ↔ {pair[1]})")
    bx.legend(fontsize=9)
    bx.grid(alpha=0.3, axis="y")
    written.append(save_figure(fig, out / "digits_mean_softmax.png"))
    return written


def run_digits(out_dir: str | Path, *, seed: int = 0, example: int = 0, epochs: int = 10, hidden: int = 64,
               lrs: tuple[float, ...] = DEFAULT_LRS, per_class: int = 5) -> list[Path]:
    """Train the MLP, check −ηAKG against real SGD steps on train example ``example``, and write four PNGs and
    ``digits_summary.json`` into ``out_dir``."""
    data = load_digits_split(seed=seed)
    if not 0 <= example < len(data.y_train):
        raise InputError(f"the training example must be in [0, {len(data.y_train) - 1}], got {example}",
                         field="--example")
    if len(set(lrs)) < 2 or min(lrs) <= 0:
        raise InputError(f"give at least two different positive learning rates (for the slope), got {list(lrs)}",
                         field="--lrs")
    if epochs < 0 or hidden < 1 or per_class < 1:
        raise InputError("--epochs must be >= 0, --hidden and --per-class >= 1")
    lrs = tuple(sorted(set(lrs)))
    model = train_mlp(make_mlp(hidden, seed), data.x_train, data.y_train, epochs=epochs, seed=seed)
    x_u, y_u = data.x_train[example], int(data.y_train[example])
    dec = decompose(model, data.x_test, x_u, y_u)
    measured = {lr: measured_delta_logp(model, data.x_test, x_u, y_u, lr) for lr in lrs}
    predicted = {lr: predicted_delta_logp(dec, lr) for lr in lrs}
    errors = [relative_error(measured[lr], predicted[lr]) for lr in lrs]
    slope = loglog_slope(lrs, errors)
    heat = class_influence(model, data, per_class)
    mean_probs = mean_softmax_by_class(model, data.x_test, data.y_test)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = sorted({lrs[0], lrs[-1]})
    written = _plots(out, data=data, example=example, y_u=y_u, lrs=lrs, errors=errors, slope=slope,
                     pairs=[(lr, measured[lr], predicted[lr]) for lr in shown], heat=heat, mean_probs=mean_probs,
                     per_class=per_class)
    summary = {
        "seed": seed, "epochs": epochs, "hidden": hidden, "num_train": len(data.y_train),
        "num_test": len(data.y_test), "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "example": {"index": example, "label": y_u, "p_label": float(dec.G[y_u] + 1)},
        "relative_error": {f"{lr:g}": err for lr, err in zip(lrs, errors)},
        "loglog_slope": slope,
        "influence_heatmap": {"definition": "row c: step on a training example of class c; column c': mean over test "
                                            "examples of true class c' of -[A K G]_{c'} (dlog pi(c'|x_o) per unit lr)",
                              "per_class": per_class, "values": heat.tolist()},
        "mean_softmax_by_true_class": mean_probs.tolist(),
    }
    path = out / "digits_summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return [*written, path]
