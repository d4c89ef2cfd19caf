"""The squeezing effect of a negative gradient on a linear softmax model (paper App. C, notebook
``squeeze_effect.ipynb``): the analytic first-order change, the paper's five cases, and their figures.

    dynlab toy squeeze --out figures/squeeze
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 10086
NUM_CLASSES, INPUT_DIM = 50, 4  # cases A–D
LARGE_CLASSES, LARGE_INPUT_DIM = 1000, 50  # case E
PEAK_REGION = tuple(range(5, 13))  # multi-hot target of the one GD step that makes W peaky


def softmax(z: np.ndarray) -> np.ndarray:
    """logits (..., V) -> probabilities (..., V), computed stably in float64."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def one_hot(index: int, num_classes: int) -> np.ndarray:
    """index -> e_index (V,)."""
    e = np.zeros(num_classes)
    e[index] = 1.0
    return e


def linear_step(w: np.ndarray, x: np.ndarray, *, minus: int | None = None, minus_lr: float = 0.0,
                plus: int | None = None, plus_lr: float = 0.0) -> np.ndarray:
    """One update of the linear softmax model z = xᵀW, as in the notebook:
    W ← W + λ⁻ x (π − e_minus)ᵀ − λ⁺ x (π − e_plus)ᵀ, i.e. gradient descent on −log π(plus) and gradient *ascent*
    on −log π(minus) (the negative gradient). In logit space Δz = ‖x‖² [λ⁻(π − e_minus) − λ⁺(π − e_plus)].

    W (I, V), x (I,) -> W' (I, V).
    """
    probs = softmax(x @ w)  # (V,)
    num_classes = w.shape[1]
    delta = np.zeros(num_classes)
    if minus is not None:
        delta += minus_lr * (probs - one_hot(minus, num_classes))
    if plus is not None:
        delta -= plus_lr * (probs - one_hot(plus, num_classes))
    return w + np.outer(x, delta)


def negative_step_logits(z: np.ndarray, ybar: int, eta: float) -> np.ndarray:
    """One negative-gradient step of size η on log π(ȳ) taken directly in logit space:
    Δz_ȳ = −η(1 − π_ȳ), Δz_i = +ηπ_i (i ≠ ȳ), i.e. z' = z + η(π − e_ȳ).

    logits (..., V) -> logits (..., V).
    """
    probs = softmax(z)
    return z + eta * (probs - one_hot(ybar, z.shape[-1]))


def first_order_delta_logp(probs: np.ndarray, ybar: int, eta: float) -> np.ndarray:
    """First-order Δlog π after :func:`negative_step_logits`: η(π_i − ‖π‖² + π_ȳ) for i ≠ ȳ and
    η(2π_ȳ − 1 − ‖π‖²) ≤ −η(1 − π_ȳ)² for ȳ itself (Δlog π = AΔz with A = I − 1πᵀ).

    probs (..., V) -> Δlog π (..., V).
    """
    sq_norm = (probs**2).sum(axis=-1, keepdims=True)
    p_bar = probs[..., ybar : ybar + 1]
    return eta * (probs - sq_norm + p_bar - one_hot(ybar, probs.shape[-1]))


def predicted_risers(probs: np.ndarray, ybar: int) -> np.ndarray:
    """The labels whose probability rises after a small negative step on ȳ ("rich get richer"):
    {i ≠ ȳ : π_i > ‖π‖² − π_ȳ}. y* = argmax_{i≠ȳ} π_i is always among them.

    probs (..., V) -> mask (..., V) of bool.
    """
    threshold = (probs**2).sum(axis=-1, keepdims=True) - probs[..., ybar : ybar + 1]
    rises = probs > threshold
    rises[..., ybar] = False
    return rises


@dataclass(frozen=True)
class SqueezeCase:
    """One of the notebook's cases: a starting W (by name), an input and the labels stepped on."""

    name: str
    title: str
    weights: str  # key of :func:`toy_weights`
    minus: int | None = None
    minus_lr: float = 0.0
    plus: int | None = None
    plus_lr: float = 0.0


# the notebook's cases A–E (PAPER_NOTES §2) and two extras. With seed 10086 the peak of the peaky W is class 8
# (π 0.76) while case C's class 11 ranks third (π 0.03), so C′ steps on the actual peak. Case D pairs the valley
# negative with a positive step on 25, and in this single-input linear model the two π terms of Δz cancel
# (Δz ∝ e_25 − e_42), so D′ is the pure valley step (the notebook's earlier, commented-out D).
CASES = (
    SqueezeCase("A", "A: random W, positive step on class 21 (λ⁺=0.5)", "uniform", plus=21, plus_lr=0.5),
    SqueezeCase("B", "B: flat W, negative step on class 42 (λ⁻=0.3)", "flat", minus=42, minus_lr=0.3),
    SqueezeCase("C", "C: peaky W, negative step on class 11 (λ⁻=0.5)", "peaky", minus=11, minus_lr=0.5),
    SqueezeCase("C_peak", "C′ (extra): peaky W, negative step on its actual peak, class 8 (λ⁻=0.5)", "peaky",
                minus=8, minus_lr=0.5),
    SqueezeCase("D", "D: peaky W, negative on valley class 42 + positive on class 25 (λ⁻=λ⁺=0.5)", "peaky",
                minus=42, minus_lr=0.5, plus=25, plus_lr=0.5),
    SqueezeCase("D_valley", "D′ (extra): peaky W, negative step on valley class 42 only (λ⁻=0.5)", "peaky",
                minus=42, minus_lr=0.5),
    SqueezeCase("E", "E: 1,000 classes, negative step on class 100 (λ⁻=1)", "large", minus=100, minus_lr=1.0),
)


def toy_weights(seed: int = SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The notebook's inputs and weights, drawn in its order from ``np.random.seed(seed)`` (so seed 10086 gives its
    exact figures): name -> (x (I,), W (I, V)) for ``uniform``, ``flat``, ``peaky`` (I=4, V=50) and ``large``
    (I=50, V=1000)."""
    rng = np.random.RandomState(seed)  # legacy generator: the notebook's np.random.randn stream
    x = rng.randn(INPUT_DIM)
    w_uniform = rng.randn(INPUT_DIM, NUM_CLASSES)
    w_flat = np.ones((INPUT_DIM, NUM_CLASSES)) + 0.05 * rng.randn(INPUT_DIM, NUM_CLASSES)
    # peaky: one lr-1 GD step from a random W towards the multi-hot target on classes 5–12
    w0 = rng.randn(INPUT_DIM, NUM_CLASSES)
    target = np.zeros(NUM_CLASSES)
    target[list(PEAK_REGION)] = 1.0
    w_peaky = w0 - np.outer(x, softmax(x @ w0) - target)
    x_large = rng.randn(LARGE_INPUT_DIM)
    w_large = 0.5 * rng.randn(LARGE_INPUT_DIM, LARGE_CLASSES)
    return {"uniform": (x, w_uniform), "flat": (x, w_flat), "peaky": (x, w_peaky), "large": (x_large, w_large)}


def run_case(case: SqueezeCase, weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One case's distributions: -> (π before (V,), π after (V,))."""
    x, w = weights[case.weights]
    after = linear_step(w, x, minus=case.minus, minus_lr=case.minus_lr, plus=case.plus, plus_lr=case.plus_lr)
    return softmax(x @ w), softmax(x @ after)


def case_summary(case: SqueezeCase, before: np.ndarray, after: np.ndarray) -> dict:
    """The numbers behind one panel: π of the stepped labels, max π and argmax before/after, how many π rose."""
    summary = {"title": case.title, "num_classes": int(before.size)}
    for role, label in (("minus", case.minus), ("plus", case.plus)):
        if label is not None:
            summary[role] = {"label": label, "rank_before": int((before > before[label]).sum()) + 1,
                             "p_before": float(before[label]), "p_after": float(after[label])}
    summary.update(max_p_before=float(before.max()), max_p_after=float(after.max()),
                   argmax_before=int(before.argmax()), argmax_after=int(after.argmax()),
                   num_risen=int((after > before).sum()), num_fallen=int((after < before).sum()),
                   min_p_before=float(before.min()), min_p_after=float(after.min()))
    if case.minus is not None and case.plus is None:
        summary["num_predicted_risers"] = int(predicted_risers(before, case.minus).sum())
    return summary


def _plot_panel(ax, case: SqueezeCase, before: np.ndarray, after: np.ndarray, log: bool) -> None:
    idx = np.arange(before.size)
    many = before.size > 100  # markers would hide the curves for 1,000 classes
    ax.plot(idx, before, "-" if many else "o-", color="tab:gray", lw=1, ms=3, label="before")
    ax.plot(idx, after, "-" if many else "s-", color="tab:red", lw=1, ms=3, alpha=0.8, label="after")
    if case.minus is not None:
        ax.axvline(case.minus, color="tab:blue", ls="--", lw=1, label=f"ȳ = {case.minus} (pushed down)")
    if case.plus is not None:
        ax.axvline(case.plus, color="tab:green", ls="--", lw=1, label=f"{case.plus} (pulled up)")
    ax.set_xlabel("class index")
    ax.set_ylabel("π (log scale)" if log else "π")
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{case.title}\n{'log' if log else 'linear'} scale", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def plot_case(case: SqueezeCase, before: np.ndarray, after: np.ndarray, path: str | Path) -> Path:
    """Before/after π against class index, linear (left) and log (right) y-scale, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, log in zip(axes, (False, True)):
        _plot_panel(ax, case, before, after, log)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_grid(results: dict[str, tuple[SqueezeCase, np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """All cases in one PNG: a row per case, linear and log scale side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 3.3 * len(results)), squeeze=False)
    for row, (case, before, after) in zip(axes, results.values()):
        for ax, log in zip(row, (False, True)):
            _plot_panel(ax, case, before, after, log)
    fig.suptitle("Squeezing effect on a linear softmax model: π before/after one step")
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def run_squeeze(out_dir: str | Path, seed: int = SEED) -> list[Path]:
    """Run every case; write ``squeeze_<case>.png``, ``squeeze_all.png`` and ``squeeze_summary.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = toy_weights(seed)
    results = {case.name: (case, *run_case(case, weights)) for case in CASES}
    written = [plot_case(case, before, after, out / f"squeeze_{name}.png")
               for name, (case, before, after) in results.items()]
    written.append(plot_grid(results, out / "squeeze_all.png"))
    summary = {"seed": seed, "cases": {name: case_summary(*r) for name, r in results.items()}}
    path = out / "squeeze_summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    written.append(path)
    return written
