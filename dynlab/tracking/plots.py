"""Paper-style figures from runs' probe trajectories: mean Δlog π per probe type over training, the squeezing panel,
an overlay of several runs (e.g. baseline SFT→DPO against ExtendSFT→DPO), and per run the per-token strips of a
probe pair (RUN_DIR/tokens) and step-0 CHES against the final Δlog π(y⁺) of each probe pair.

    dynlab plot runs/dpo/version_0 [runs/dpo/version_1 ...] --out figures/
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from dynlab.tracking.trajectory import DYNAMICS_DIR, read_tokens, read_trajectory  # noqa: E402

# colour families: what is trained on / its rephrases (blues), rejected family (reds), other prompts' responses
# (greens), non-human text (greys), the model's own sample (purple); within a family shade, line and marker differ,
# so every type stays distinguishable in colour and in greyscale
STYLE = {
    "chosen": ("#1f77b4", "-", "o"), "chosen_gptsemantic": ("#6baed6", "--", "^"),
    "chosen_gptformat": ("#08306b", ":", "s"),
    "rejected": ("#d62728", "-", "o"), "reject_gptsemantic": ("#fc9272", "--", "^"),
    "reject_gptformat": ("#67000d", ":", "s"),
    "irr_train": ("#2ca02c", "-", "D"), "irr_test": ("#74c476", "--", "v"), "irr_hum": ("#808000", "-.", "P"),
    "random_permute": ("#404040", "-", "x"), "random_nonhum": ("#a0a0a0", "--", "+"),
    "chosen_initial": ("#9467bd", "-", "*"), "argmax": ("black", "-", "."),
}
FALLBACK_STYLE = ("#8c564b", "-.", "h")  # a type this table does not know


def run_label(run_dir: str | os.PathLike) -> str:
    """``runs/dpo/version_3`` -> ``dpo/version_3``."""
    path = Path(run_dir).resolve()
    return f"{path.parent.name}/{path.name}"


def run_labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """:func:`run_label` of each run, with more parent directories where two runs would share a label
    (``base/dpo/version_0`` and ``extend/dpo/version_0``): one label per run, so no run's figures are dropped."""
    paths = [Path(r).resolve() for r in run_dirs]
    labels = [run_label(p) for p in paths]
    depth = 2
    while len(set(labels)) < len(set(paths)) and depth < max(len(p.parts) for p in paths):
        depth += 1
        labels = ["/".join(p.parts[-depth:]).lstrip("/") for p in paths]
    return labels


def mean_curves(frame: pd.DataFrame, split: str, metric: str) -> pd.DataFrame:
    """Mean and standard error over probe examples: index step, columns (stat, type)."""
    sub = frame[frame["split"] == split]
    grouped = sub.groupby(["step", "type"])[metric]
    return pd.concat({"mean": grouped.mean(), "sem": grouped.sem().fillna(0.0)}, axis=1).unstack("type")


def _with_argmax(frame: pd.DataFrame) -> pd.DataFrame:
    """Add y*, the teacher-forced argmax along the chosen prefix, as a pseudo-type ``argmax`` (Δ since step 0)."""
    chosen = frame[frame["type"] == "chosen"].copy()
    start = chosen[chosen["step"] == chosen["step"].min()].set_index(["split", "row"])["argmax_logp"]
    chosen["dlogp"] = chosen["argmax_logp"].to_numpy() - start.reindex(
        pd.MultiIndex.from_frame(chosen[["split", "row"]])).to_numpy()
    chosen["type"] = "argmax"
    return pd.concat([frame, chosen], ignore_index=True)


def _plot_lines(ax, curves: pd.DataFrame, types: Sequence[str], label_prefix: str = "", style=None) -> None:
    for t in types:
        if ("mean", t) not in curves:
            continue
        colour, line, marker = STYLE.get(t, FALLBACK_STYLE)
        line = style or line
        mean, sem = curves[("mean", t)], curves[("sem", t)]
        ax.plot(mean.index, mean.values, line, color=colour, marker=marker, markersize=4, label=f"{label_prefix}{t}",
                lw=1.8)
        ax.fill_between(mean.index, mean - sem, mean + sem, color=colour, alpha=0.12, lw=0)


def plot_probe_dlogp(frame: pd.DataFrame, out: Path, title: str) -> Path:
    """Mean Δlog π(y|x) per probe type over training, one panel per probe split (the paper's probe figure)."""
    splits = sorted(frame["split"].unique(), key=["train", "test"].index)
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.6), squeeze=False, sharey=True)
    frame = _with_argmax(frame)
    types = [t for t in STYLE if t in set(frame["type"])]
    for ax, split in zip(axes[0], splits):
        _plot_lines(ax, mean_curves(frame, split, "dlogp"), types)
        ax.axhline(0, color="k", lw=0.6)
        ax.set(title=f"probe_{split}: {'training' if split == 'train' else 'held-out'} prompts",
               xlabel="optimizer step", ylabel="Δ log π(y | x) since step 0 (nats, sum over tokens)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{title} — mean over probe examples, band = ±1 s.e.")
    return save_figure(fig, out)


def plot_squeezing(frame: pd.DataFrame, out: Path, title: str, split: str = "train") -> Path:
    """Chosen, rejected and the argmax response together, with the peakiness of the predictions along y⁺."""
    frame = _with_argmax(frame)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    _plot_lines(left, mean_curves(frame, split, "dlogp"), ["chosen", "rejected", "argmax"])
    left.axhline(0, color="k", lw=0.6)
    left.set(title="log-probability since step 0", xlabel="optimizer step", ylabel="Δ log π (nats)")
    left.legend(fontsize=9)
    left.grid(alpha=0.3)
    chosen = frame[(frame["split"] == split) & (frame["type"] == "chosen")].groupby("step")
    right.plot(chosen["max_prob"].mean(), color="black", label="max_prob: mean_m max_v π_m(v)")
    right.plot(chosen["peakiness"].mean(), color="tab:orange", label="peakiness: mean_m ‖π_m‖²")
    right.set(title="peakedness of π_m along y⁺", xlabel="optimizer step", ylabel="probability mass")
    right.legend(fontsize=9)
    right.grid(alpha=0.3)
    fig.suptitle(f"{title} — squeezing view: y⁺, y⁻ and the teacher-forced argmax response y* (probe_{split})")
    return save_figure(fig, out)


def plot_overlay(frames: dict[str, pd.DataFrame], out: Path) -> Path:
    """Several runs on one set of axes, one colour per run: Δlog π of chosen, rejected and the argmax response y*,
    and the peakiness of the predictions along y⁺ (mean_m ‖π_m‖²), one row per probe split (e.g. off-policy DPO
    against SPIN, online DPO and SPPO from the same start, or SFT→DPO against ExtendSFT→DPO)."""
    splits = [s for s in ("train", "test") if any((f["split"] == s).any() for f in frames.values())]
    panels = [("chosen", "chosen (y⁺)"), ("rejected", "rejected (y⁻)"), ("argmax", "argmax (y*)"),
              ("peakiness", "peakiness along y⁺")]
    fig, axes = plt.subplots(len(splits), len(panels), figsize=(20, 4.4 * len(splits)), squeeze=False, sharex=True)
    colours = plt.get_cmap("tab10").colors
    for i, (label, frame) in enumerate(frames.items()):
        colour = colours[i % len(colours)]
        for row, split in zip(axes, splits):
            dlogp = mean_curves(_with_argmax(frame), split, "dlogp")
            peaky = mean_curves(frame, split, "peakiness")
            for ax, (t, _) in zip(row, panels):
                curves, key = (peaky, "chosen") if t == "peakiness" else (dlogp, t)
                if ("mean", key) not in curves:
                    continue
                mean, sem = curves[("mean", key)], curves[("sem", key)]
                ax.plot(mean.index, mean.values, "-", color=colour, marker=".", lw=1.8, label=label)
                ax.fill_between(mean.index, mean - sem, mean + sem, color=colour, alpha=0.12, lw=0)
    for row, split in zip(axes, splits):
        for ax, (t, title) in zip(row, panels):
            ylabel = "mean_m ‖π_m‖²" if t == "peakiness" else "Δ log π since each run's step 0 (nats)"
            ax.set(title=f"{title}, probe_{split}", xlabel="optimizer step", ylabel=ylabel)
            if t != "peakiness":
                ax.axhline(0, color="k", lw=0.6)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("runs compared — mean over probe examples, band = ±1 s.e.")
    return save_figure(fig, out)


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Every figure for ``run_dirs`` into ``out_dir``; returns the PNG paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = {}
    for run, label in zip(run_dirs, run_labels(run_dirs)):
        frame = read_trajectory(run)
        if frame.empty:
            raise FileNotFoundError(f"{run}: no probe trajectory (probes/trajectory/*.parquet); not a dynlab fit run?")
        frames[label] = frame
    written = []
    for label, frame in frames.items():
        prefix = "" if len(frames) == 1 else label.replace("/", "_") + "_"
        written.append(plot_probe_dlogp(frame, out / f"{prefix}probe_dlogp.png", label))
        written.append(plot_squeezing(frame, out / f"{prefix}squeezing.png", label))
        if "dyn_observed" in frame.columns:
            written.append(plot_dynamics(frame, out / f"{prefix}dynamics_predicted_vs_observed.png", label))
        run = run_dirs[list(frames).index(label)]
        similarity = sorted((Path(run) / DYNAMICS_DIR).glob("similarity_step_*.json"))
        if similarity:
            written.append(plot_similarity(similarity, out / f"{prefix}gradient_similarity.png", label))
        tokens = read_tokens(run)
        for split in ("train", "test"):
            if (tokens["split"] == split).any():
                written.append(plot_token_strips(tokens, split, out / f"{prefix}tokens_{split}.png", label))
            if "ches_norm" in frame.columns and (frame["split"] == split).any():
                path = plot_ches_vs_dlogp(frame, split, out / f"{prefix}ches_vs_dlogp_{split}.png", label)
                written += [path] if path is not None else []
    if len(frames) > 1:
        written.append(plot_overlay(frames, out / "overlay.png"))
    return written


def plot_dynamics(frame: pd.DataFrame, out: Path, title: str) -> Path:
    """DynamicsCallback's first-order prediction ⟨∇θ log π, Δθ⟩ against the observed Δ log π over the next step, one
    point per (step, probe example, type), coloured by type; the diagonal is a perfect prediction."""
    data = frame.dropna(subset=["dyn_observed", "dyn_predicted"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, column, name in ((axes[0], "dyn_predicted", "⟨∇θ log π, Δθ⟩ (actual update)"),
                             (axes[1], "dyn_predicted_sgd", "−η⟨∇θ log π, ∇θ L⟩ (SGD form)")):
        if column not in data.columns:
            ax.set_visible(False)
            continue
        for ptype, group in data.groupby("type", sort=False):
            color, _, marker = STYLE.get(ptype, FALLBACK_STYLE)
            ax.scatter(group["dyn_observed"], group[column], s=14, color=color, marker=marker, label=ptype, alpha=0.7)
        low = min(data["dyn_observed"].min(), data[column].min())
        high = max(data["dyn_observed"].max(), data[column].max())
        ax.plot([low, high], [low, high], color="black", lw=0.8, ls="--")
        corr = data[["dyn_observed", column]].corr().iloc[0, 1]
        ax.set_title(f"predicted: {name}\nPearson r = {corr:.3f}", fontsize=9)
        ax.set_xlabel("observed Δ log π(y|x) over one step (nats)")
        ax.set_ylabel("predicted Δ log π (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{title}: first-order influence of one update (steps {sorted(data['step'].unique().tolist())})")
    return save_figure(fig, out)


def plot_similarity(files: Sequence[Path], out: Path, title: str) -> Path:
    """Mean cosine similarity of ∇θ log π(y|x) between probe types of the same prompt (DynamicsCallback), at the
    first and last step recorded: which responses a step moves together."""
    records = [json.loads(Path(f).read_text()) for f in (files[0], files[-1])] if len(files) > 1 else \
        [json.loads(Path(files[0]).read_text())]
    fig, axes = plt.subplots(1, len(records), figsize=(6.2 * len(records), 5.4), squeeze=False)
    for ax, record in zip(axes[0], records):
        types = record["types"]
        image = ax.imshow(record["matrix"], cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(types)), types, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(types)), types, fontsize=7)
        ax.set_title(f"step {record['step']} (probe_{record['split']}, {len(record['rows'])} prompts)", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="cos(∇θ log π(y_a|x), ∇θ log π(y_b|x))")
    fig.suptitle(f"{title}: gradient similarity between responses of the same prompt")
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


STRIP_CHARS = 120  # characters per line of a token strip (monospace: a 100-token response takes 3-5 lines)
STRIP_TYPES = (("chosen", "chosen response y⁺"), ("rejected", "rejected response y⁻"))


def _shown(token: str) -> str:
    """A decoded token as drawn: whitespace other than spaces made visible, an empty one as ∅."""
    return token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") or "∅"


def strip_layout(tokens: Sequence[str], width: int = STRIP_CHARS) -> list[tuple[int, int, str]]:
    """(line, column, text) of each token, wrapped at ``width`` characters between tokens (a token never split, one
    longer than a line cut to it) and after a token that ends a line of the text."""
    out, line, col = [], 0, 0
    for token in tokens:
        text = _shown(token)[:width]
        if col and col + len(text) > width:
            line, col = line + 1, 0
        out.append((line, col, text))
        col += len(text)
        if token.endswith("\n"):
            line, col = line + 1, 0
    return out


def plot_token_strips(tokens: pd.DataFrame, split: str, out: Path, title: str) -> Path:
    """The chosen and the rejected response of the lowest kept probe row (row 0) at the last evaluation, token by
    token, each token's box coloured by Δ log π(y_t | x, y_<t) since step 0 on one diverging scale centred at 0
    (blue: more likely than at step 0, red: less; grey: no step-0 value)."""
    sub = tokens[tokens["split"] == split]
    step = int(sub["step"].max())
    sub = sub[sub["step"] == step]
    row = int(sub["row"].min())
    shown = [(sub[(sub["row"] == row) & (sub["type"] == t)], name) for t, name in STRIP_TYPES]
    shown = [(r.iloc[0], name) for r, name in shown if len(r)]
    deltas = [np.asarray(r["dlogp"] if r["dlogp"] is not None else np.full(len(r["tokens"]), np.nan), dtype=float)
              for r, _ in shown]
    finite = np.concatenate([d[np.isfinite(d)] for d in deltas] + [np.zeros(1)])
    vmax = max(float(np.abs(finite).max()), 1e-6)
    norm, cmap = Normalize(-vmax, vmax), plt.get_cmap("RdBu")
    layouts = [strip_layout(list(r["tokens"])) for r, _ in shown]
    lines = [max(line for line, _, _ in lay) + 1 if lay else 1 for lay in layouts]
    width_in, margin, line_in, head_in, bar_in = 14.0, 0.25, 0.33, 0.55, 1.0
    axes_in = width_in - 2 * margin
    # DejaVu Sans Mono advances 0.602 em per character: 96% of the size at which STRIP_CHARS characters fill a line,
    # so a token's text stays inside its box
    fontsize = 0.96 * axes_in * 72 / STRIP_CHARS / 0.602
    height_in = 0.45 + sum(head_in + n * line_in for n in lines) + bar_in
    fig = plt.figure(figsize=(width_in, height_in))
    top = height_in - 0.45
    for (record, name), layout, delta, n in zip(shown, layouts, deltas, lines):
        top -= head_in
        ax = fig.add_axes((margin / width_in, (top - n * line_in) / height_in, axes_in / width_in,
                           n * line_in / height_in))
        ax.set(xlim=(0, STRIP_CHARS), ylim=(n, 0))
        ax.axis("off")
        for (line, col, text), value in zip(layout, delta):
            known = np.isfinite(value)
            colour = cmap(norm(value)) if known else "#cfcfcf"
            ax.add_patch(Rectangle((col, line + 0.06), len(text), 0.88, facecolor=colour, edgecolor="white", lw=0.8))
            dark = known and abs(norm(value) - 0.5) > 0.33
            ax.text(col, line + 0.5, text, fontfamily="DejaVu Sans Mono", fontsize=fontsize, va="center",
                    ha="left", color="white" if dark else "black")
        total = np.nansum(delta) if np.isfinite(delta).any() else float("nan")
        ax.set_title(f"{name}: {len(layout)} tokens, log π(y|x) = {float(np.sum(record['logp'])):.2f}, "
                     f"Σ_t Δ log π = {total:+.3f} nats since step 0", loc="left", fontsize=11)
        top -= n * line_in
    cax = fig.add_axes((0.3, 0.45 / height_in, 0.4, 0.18 / height_in))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal",
                 label="Δ log π(y_t | x, y_<t) since step 0 (nats): blue more likely, red less")
    fig.suptitle(f"{title}: per-token change since step 0 at step {step}, probe_{split} row {row} "
                 "(one box per token; ↵ = newline)", x=margin / width_in, ha="left", y=1 - 0.15 / height_in,
                 fontsize=12)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_ches_vs_dlogp(frame: pd.DataFrame, split: str, out: Path, title: str) -> Path | None:
    """Each probe pair's normalised CHES at step 0 (x) against Δ log π(y⁺) since step 0 at the last evaluation (y),
    with the Pearson r over the pairs; None (and a printed note) with fewer than 3 pairs that have both."""
    chosen = frame[(frame["split"] == split) & (frame["type"] == "chosen")]
    first, last = int(chosen["step"].min()), int(chosen["step"].max())
    x = chosen[chosen["step"] == first].set_index("row")["ches_norm"]
    y = chosen[chosen["step"] == last].set_index("row")["dlogp"] if "dlogp" in chosen else pd.Series(dtype=float)
    both = pd.concat({"x": x, "y": y}, axis=1).dropna()
    if last == first or len(both) < 3:
        print(f"dynlab plot: {title}: probe_{split}: {len(both)} probe pairs with a step-0 ches_norm and a final "
              f"Δ log π(y⁺) (steps {first}..{last}); the CHES scatter needs at least 3, not drawn")
        return None
    r = float(np.corrcoef(both["x"], both["y"])[0, 1]) if both["x"].std() > 0 and both["y"].std() > 0 else np.nan
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    ax.scatter(both["x"], both["y"], s=28, color=STYLE["chosen"][0], alpha=0.8, edgecolor="black", lw=0.4)
    if np.isfinite(r):  # the least-squares line the r measures
        slope, intercept = np.polyfit(both["x"], both["y"], 1)
        grid = np.linspace(both["x"].min(), both["x"].max(), 2)
        ax.plot(grid, slope * grid + intercept, color="black", lw=0.9, ls="--", label="least-squares line")
        ax.legend(fontsize=8)
    if both["y"].min() < 0 < both["y"].max():
        ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="normalised CHES at step 0 (ches_norm)",
           ylabel=f"Δ log π(y⁺ | x) at step {last} since step 0 (nats)")
    ax.grid(alpha=0.3)
    r_text = f"{r:.3f}" if np.isfinite(r) else "undefined (a constant axis)"
    ax.set_title(f"{title}, probe_{split}: step-0 CHES vs final Δ log π(y⁺)\nPearson r = {r_text}, "
                 f"n = {len(both)} probe pairs", fontsize=10)
    return save_figure(fig, out)
