"""One self-contained HTML page about one or more runs: the paper's signatures checked, the paper-style figures, the
training curves, each run's config and what differs between runs, and the probe examples that moved most. Figures
are embedded as base64 PNG data URIs and the CSS is inline, so the file opens anywhere without a network.

    dynlab report runs/sft/version_0 runs/dpo/version_0 --out report.html
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dynlab.errors import InputError
from dynlab.evaluation.generation import write_text_atomic
from dynlab.evaluation.signatures import (
    check_run_dir,
    format_numbers,
    load_trajectory,
    probe_texts,
    read_run_config,
    result_word,
)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1400px; padding: 0 1.5em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: .3em .55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.pass td.result { background: #dff3df; } tr.fail td.result { background: #fbe3e3; }
tr.undecided td.result { background: #f1f1f1; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 12px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: 12px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.text { white-space: pre-wrap; max-width: 38em; } td.numbers { white-space: nowrap; } td.claim { max-width: 48em; }
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MISSING = type("Missing", (), {"__repr__": lambda self: "MISSING"})()  # a key one config does not have
RESULT_CLASS = {True: "pass", False: "fail", None: "undecided"}  # the row's colour; its words are result_word's
SPLITS = ("train", "test")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def check_run_dirs(run_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Each run dir exists and holds a readable config.yaml and a probe trajectory
    (:func:`~dynlab.evaluation.signatures.check_run_dir`), else an InputError naming the path."""
    if not run_dirs:
        raise InputError("give at least one run directory")
    return [check_run_dir(run) for run in run_dirs]


def img_tag(png: bytes, alt: str) -> str:
    """An <img> holding ``png`` as a base64 data URI."""
    if not png.startswith(PNG_MAGIC):
        raise ValueError(f"{alt}: not a PNG")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def figure(png: bytes, caption: str) -> str:
    return f"<figure>{img_tag(png, caption)}<figcaption>{esc(caption)}</figcaption></figure>"


# ---- 1. the signatures --------------------------------------------------------------------------------------------
def signature_table_html(run_dirs: Sequence[Path], split: str) -> str:
    """One split's table of :func:`dynlab.evaluation.signatures.check_signatures`: every check, failed ones
    included, worded by :func:`~dynlab.evaluation.signatures.result_word` as in ``signature_table``."""
    from dynlab.evaluation.signatures import check_signatures

    signatures = check_signatures([str(r) for r in run_dirs], split=split)
    rows = []
    for sig in signatures:
        numbers = "<br>".join(map(esc, format_numbers(sig.numbers)))
        detail = f"<br><small>{esc(sig.detail)}</small>" if sig.detail else ""
        rows.append(f'<tr class="{RESULT_CLASS[sig.passed]}"><td class="num">{esc(sig.id)}</td>'
                    f'<td class="claim">{esc(sig.claim)}{detail}</td>'
                    f'<td class="result">{esc(result_word(sig))}</td><td class="mono numbers">{numbers}</td>'
                    f"<td>{esc(', '.join(sig.runs) or '–')}</td><td>{esc(sig.reference or '–')}</td></tr>")
    counts: dict[str, int] = {}
    for sig in signatures:
        counts[result_word(sig)] = counts.get(result_word(sig), 0) + 1
    summary = ", ".join(f"{n} {word}" for word, n in counts.items())
    return (f'<h3 id="signatures-{esc(split)}">probe_{esc(split)}</h3><p>{len(signatures)} checks: {esc(summary)}.</p>'
            f'<table id="signature-table-{esc(split)}" class="signatures"><thead><tr><th>id</th><th>claim</th>'
            "<th>result</th><th>numbers</th><th>runs</th><th>reference</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def signature_section(run_dirs: Sequence[Path], splits: Sequence[str] = SPLITS) -> str:
    """The signature table of each probe split in ``splits``."""
    splits = [splits] if isinstance(splits, str) else splits
    return ('<h2 id="signatures">The paper\'s signatures</h2><p>A signature "not shown" here may still hold at a '
            "larger scale (more steps, a larger model); its numbers are given either way. 12 and 16 are invariants: "
            "a FAIL there is a bug or a NaN in the trajectory.</p>"
            + "".join(signature_table_html(run_dirs, split) for split in splits))


# ---- 2. the figures of dynlab plot --------------------------------------------------------------------------------
def figures_section(run_dirs: Sequence[Path]) -> str:
    """The figures; a trajectory without a column they need is an InputError naming it."""
    from dynlab.tracking.plots import plot_runs

    with tempfile.TemporaryDirectory(prefix="dynlab-report-") as tmp:
        try:
            parts = [figure(p.read_bytes(), p.name) for p in plot_runs(run_dirs, tmp)]
        except KeyError as err:  # pandas: KeyError('peakiness') or KeyError('Column not found: peakiness')
            column = str(err.args[0] if err.args else "?").removeprefix("Column not found: ").strip("'\"")
            run = next((r for r in run_dirs if column not in load_trajectory(r).columns), run_dirs[0])
            raise InputError(f"the probe trajectory has no {column!r} column, which the figures need",
                             file=str(run / "probes" / "trajectory")) from None
    return '<h2 id="figures">Probe dynamics (the figures of <code>dynlab plot</code>)</h2>' + "".join(parts)


# ---- 3. configs and their differences -----------------------------------------------------------------------------
def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as ``{"a.b.0.c": leaf}``."""
    if isinstance(value, Mapping) and value:
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def read_config(run: Path) -> tuple[str, dict[str, Any]]:
    """The run's config.yaml (redacted again, in case) and its flattened values."""
    text, config = read_run_config(run, redacted=True)
    return text, flatten(config)


def config_differences(flat: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Keys whose values differ between the configs, in first-seen order; a key a config lacks is :data:`MISSING`
    there (and differs from any value, null included)."""
    keys = dict.fromkeys(k for f in flat for k in f)
    values = {k: [f.get(k, MISSING) for f in flat] for k in keys}
    return {k: v for k, v in values.items()
            if len({"\0" if x is MISSING else json.dumps(x, sort_keys=True, default=str) for x in v}) > 1}


def config_section(run_dirs: Sequence[Path], labels: Sequence[str]) -> str:
    configs = [read_config(r) for r in run_dirs]
    parts = ['<h2 id="configs">Configs</h2>']
    if len(run_dirs) > 1:
        diff = config_differences([flat for _, flat in configs])
        head = "".join(f"<th>{esc(label)}</th>" for label in labels)
        rows = "".join(f'<tr><td class="mono">{esc(key)}</td>' + "".join(
            f'<td class="mono">{esc("–" if v is MISSING else truncate(json.dumps(v, default=str), 200))}</td>'
            for v in values) + "</tr>" for key, values in diff.items())
        parts.append(f"<p>{len(diff)} settings differ between the runs.</p>" if diff else
                     "<p>The runs' configs are identical.</p>")
        if diff:
            parts.append(f'<table id="config-diff"><thead><tr><th>key</th>{head}</tr></thead><tbody>{rows}'
                         "</tbody></table>")
    for label, run, (text, _) in zip(labels, run_dirs, configs):
        parts.append(f"<details><summary>{esc(label)}: <code>{esc(run / 'config.yaml')}</code></summary>"
                     f"<pre>{esc(text)}</pre></details>")
    return "".join(parts)


# ---- 4. training curves -------------------------------------------------------------------------------------------
def curve_panels(columns: Sequence[str]) -> dict[str, list[str]]:
    """metrics.csv columns grouped into panels: ``train/loss``, ``train/rewards`` (accuracy apart), ``train/logps``,
    the learning rate (LearningRateMonitor's ``lr-*``) and the probe pairs' margins, accuracies and displacement
    diagnostics (CHES, edit distance, rate ratio)."""
    panels: dict[str, list[str]] = {}
    for column in columns:
        parts = column.split("/")
        if parts[0] == "train":
            name = "train/" + parts[1] if len(parts) > 2 else column
            if "accuracy" in parts[-1]:
                name = "train/accuracy"
        elif column.startswith("lr-") or parts[-1] in ("lr", "learning_rate"):
            name = "learning rate"
        elif parts[0] == "probe" and len(parts) == 3:  # probe/{split}/{margin,reward_margin,...}: per-pair means
            metric = parts[-1]
            name = {"margin": "probe margin (log π(y⁺) − log π(y⁻))", "reward_margin": "probe reward margin"}.get(
                metric, "probe accuracy" if "accuracy" in metric else "probe CHES" if metric.startswith("ches")
                else "probe edit distance" if metric.startswith(("edit", "first_diff"))
                else "probe rate ratio" if metric.startswith("rate_ratio") else "probe " + metric)
        else:
            continue
        panels.setdefault(name, []).append(column)
    return panels


def plot_training_curves(run_dirs: Sequence[Path], labels: Sequence[str]) -> bytes | None:
    """One PNG of every run's logged training curves (one panel per group, one colour per run), None if no run
    logged any."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frames = {}
    for label, run in zip(labels, run_dirs):
        path = run / "metrics.csv"
        if path.is_file() and path.stat().st_size:
            try:
                frame = pd.read_csv(path, encoding="utf-8")
            except ValueError as err:  # UnicodeDecodeError, a ParserError
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise InputError(f"not a readable UTF-8 CSV ({first})", file=str(path)) from None
            if "step" in frame.columns:
                frames[label] = frame
    panels: dict[str, list[str]] = {}
    for frame in frames.values():
        for name, columns in curve_panels(list(frame.columns)).items():
            panels.setdefault(name, [])
            panels[name] += [c for c in columns if c not in panels[name]]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 3.8 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (name, columns) in zip(axes.flat, panels.items()):
        for i, (label, frame) in enumerate(frames.items()):
            for j, column in enumerate(c for c in columns if c in frame.columns):
                data = frame[["step", column]].dropna()
                if data.empty:
                    continue
                marker = "o" if len(data) < 12 else None
                ax.plot(data["step"], data[column], styles[j % len(styles)], color=colours[i % len(colours)],
                        marker=marker, markersize=3, lw=1.4, label=f"{label}: {column}")
        ax.set(title=name, xlabel="optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("training curves (metrics.csv)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def curves_section(run_dirs: Sequence[Path], labels: Sequence[str]) -> str:
    png = plot_training_curves(run_dirs, labels)
    body = figure(png, "training curves") if png else "<p>No run has a metrics.csv with logged steps.</p>"
    return '<h2 id="curves">Training curves</h2>' + body


# ---- 5. the probe examples that moved most ------------------------------------------------------------------------
def top_movers(run: Path, k: int):
    """The ``k`` (split, type, row) whose log π moved most (|Δ|) from the run's first evaluation to its last."""
    frame = load_trajectory(run)
    first, last = frame["step"].min(), frame["step"].max()
    keys = ["split", "type", "row"]
    start = frame[frame["step"] == first].set_index(keys)["logp"]
    end = frame[frame["step"] == last].set_index(keys)["logp"]
    moved = (end - start).dropna().rename("delta").to_frame()
    moved["start"], moved["end"] = start, end
    moved = moved.reindex(moved["delta"].abs().sort_values(ascending=False, kind="stable").index).head(k)
    return int(first), int(last), moved.reset_index()


def movers_section(run_dirs: Sequence[Path], labels: Sequence[str], k: int, limit: int) -> str:
    parts = [f'<h2 id="movers">Probe examples that moved most (top {k} by |Δ log π|, first to last evaluation)</h2>']
    for label, run in zip(labels, run_dirs):
        first, last, moved = top_movers(run, k)
        texts = {s: probe_texts(run, s) for s in moved["split"].unique()}
        rows = []
        for item in moved.itertuples(index=False):
            rows_of_split = texts[item.split]
            if rows_of_split is None:
                prompt = response = f"(probes/probe_{item.split}.jsonl missing or unreadable)"
            elif item.row >= len(rows_of_split):
                prompt = response = f"(row {item.row} not in probes/probe_{item.split}.jsonl)"
            else:
                row = rows_of_split[item.row]
                prompt, response = (str(row.get(key, "–")).strip() for key in ("prompt", item.type))
            rows.append(f"<tr><td>{esc(item.split)}</td><td>{esc(item.type)}</td><td class='num'>{item.row}</td>"
                        f"<td class='num'>{item.start:.2f}</td><td class='num'>{item.end:.2f}</td>"
                        f"<td class='num'>{item.delta:+.2f}</td><td class='text'>{esc(truncate(prompt, limit))}</td>"
                        f"<td class='text'>{esc(truncate(response, limit))}</td></tr>")
        parts.append(f"<h3>{esc(label)} (step {first} → {last})</h3>"
                     f'<table class="movers"><thead><tr><th>split</th><th>type</th><th>row</th>'
                     f"<th>log π at {first}</th><th>log π at {last}</th><th>Δ</th><th>prompt</th><th>response</th>"
                     f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "".join(parts)


# ---- the page -----------------------------------------------------------------------------------------------------
def build_report(run_dirs: Sequence[str | os.PathLike], split: str | Sequence[str] = SPLITS, top_k: int = 5,
                 text_limit: int = 300) -> str:
    """The whole HTML page for ``run_dirs`` (checked first: a bad one is an InputError naming it), with the
    signature tables of each probe split in ``split`` (default both)."""
    from dynlab.evaluation.signatures import run_roles
    from dynlab.tracking.plots import run_labels

    runs = check_run_dirs(run_dirs)
    for run in runs:
        load_trajectory(run)  # an unreadable step file or a missing logp column: one line, before any section
    splits = [split] if isinstance(split, str) else list(split)
    labels = run_labels(runs)
    role = {path: name for name, path in run_roles(runs).items()}
    listing = "".join(f"<li><b>{esc(label)}</b> ({esc(role[run])}): <code>{esc(run.resolve())}</code></li>"
                      for label, run in zip(labels, runs))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [signature_section(runs, splits), figures_section(runs), curves_section(runs, labels),
                movers_section(runs, labels, top_k, text_limit), config_section(runs, labels)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,">'  # no favicon request, even from file://
            f"<title>dynlab report: {esc(', '.join(labels))}</title><style>{CSS}</style></head><body>"
            f"<h1>dynlab report</h1><p>Generated {stamp} from {len(runs)} run(s):</p><ul>{listing}</ul>"
            '<p><a href="#signatures">signatures</a> · <a href="#figures">figures</a> · <a href="#curves">training '
            'curves</a> · <a href="#movers">probe examples</a> · <a href="#configs">configs</a></p>'
            + "".join(sections) + "</body></html>\n")


def main(argv: Sequence[str] | None = None) -> None:
    """``dynlab report``: one self-contained HTML page (signatures, figures, curves, configs, probe examples)."""
    parser = argparse.ArgumentParser(prog="dynlab report", description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (runs/<stage>/version_N)")
    parser.add_argument("--out", required=True, help="the HTML file to write")
    parser.add_argument("--split", nargs="+", default=list(SPLITS), choices=SPLITS,
                        help="probe splits of the signature tables (default: train test)")
    parser.add_argument("--top-k", type=int, default=5, help="probe examples shown per run (default 5)")
    parser.add_argument("--text-limit", type=int, default=300, help="characters of each prompt/response shown")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise InputError(f"must be at least 1, got {args.top_k}", field="--top-k")
    if args.text_limit < 2:
        raise InputError(f"must be at least 2, got {args.text_limit}", field="--text-limit")
    out = write_text_atomic(args.out, build_report(args.runs, args.split, args.top_k, args.text_limit))
    umask = os.umask(0)
    os.umask(umask)
    out.chmod(0o666 & ~umask)  # a page to share: the usual mode of a new file, not mkstemp's 0600
    print(f"dynlab: wrote {out}")


if __name__ == "__main__":
    main()
