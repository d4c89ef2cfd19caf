"""The compare-extend report: probe dynamics of the runs, the repetition table and the judge's win rates, as one
markdown file (``scripts/compare_extend.sh`` writes the inputs).

    python -m dynlab.evaluation.report runs/compare-extend --run SFT→DPO=runs/dpo/ce-base --run ExtendSFT→DPO=...
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from dynlab.errors import InputError
from dynlab.evaluation.generation import write_text_atomic
from dynlab.evaluation.repetition import markdown_table

PROBE_TYPES = ("chosen", "rejected", "irr_hum", "random_permute")


def probe_table(runs: dict[str, str], split: str = "train") -> str:
    """Mean Δlog π since step 0 at each run's last evaluation (probe types, the argmax response y*) and the last
    max_prob along y⁺."""
    from dynlab.tracking.trajectory import read_trajectory

    head = ["run", "steps", *(f"Δ {t}" for t in PROBE_TYPES), "Δ argmax y*", "max_prob y⁺ (start → end)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, run in runs.items():
        frame = read_trajectory(run)
        frame = frame[frame["split"] == split]
        if frame.empty:
            raise InputError("no probe trajectory", file=run)
        first, last = frame["step"].min(), frame["step"].max()
        at = {s: frame[frame["step"] == s] for s in (first, last)}
        cells = [name, str(int(last))]
        for t in PROBE_TYPES:
            d = at[last][at[last]["type"] == t]["dlogp"]
            cells.append(f"{d.mean():+.1f}" if len(d) else "–")
        chosen = {s: f[f["type"] == "chosen"].set_index("row") for s, f in at.items()}
        cells.append(f"{(chosen[last]['argmax_logp'] - chosen[first]['argmax_logp']).mean():+.1f}")
        cells.append(f"{chosen[first]['max_prob'].mean():.2f} → {chosen[last]['max_prob'].mean():.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def repetition_section(files: Sequence[Path]) -> str:
    """One table of every generation file's repetition statistics, a line per (model, mode)."""
    rows = {}
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        name = path.name.removesuffix(".repetition.json")
        for mode, stats in data["repetition"].items():
            rows[f"{name} ({mode})"] = {k: math.nan if v is None else v for k, v in stats.items()}
    return markdown_table(rows, first="model (mode)")


def judge_line(summary: dict) -> str:
    s = summary["overall"]
    line = (f"| {summary['a']['label']} | {summary['b']['label']} | {s['pairs']} | {s['wins']} / {s['losses']} / "
            f"{s['ties']} | **{s['win_rate']:.3f}** | [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | "
            f"{s['position_bias']:.3f} | {s['order_agreement']:.3f} |")
    m = s.get("margin")
    if m:
        line += (f" {m['first_shown_advantage']:+.2f} | {m['debiased_win_rate']:.3f} "
                 f"[{m['debiased_ci'][0]:.3f}, {m['debiased_ci'][1]:.3f}] |")
    else:
        line += " – | – |"
    return line


def build_report(out: Path, runs: dict[str, str]) -> str:
    """The markdown report from ``out``'s ``gen/*.repetition.json``, ``judge*/summary.json``, ``figures/*.png``,
    ``timings.tsv`` and the runs' trajectories."""
    parts = ["# ExtendSFT→DPO against SFT→DPO", ""]
    if runs:
        parts += ["## Probe dynamics (probe_train, mean Δ log π in nats at the last step)", "", probe_table(runs), ""]
    figures = sorted((out / "figures").glob("*.png"))
    if figures:
        parts += ["Figures: " + ", ".join(f"[{p.name}](figures/{p.name})" for p in figures), ""]
    repetition = sorted((out / "gen").glob("*.repetition.json"), key=lambda p: p.stat().st_mtime)  # run order
    if repetition:
        parts += ["## Repetition of generations (word tokens)", "", repetition_section(repetition), "",
                  "distinct_n: distinct n-grams / n-grams of a response; rep_3: share of 3-gram positions whose "
                  "3-gram occurs twice or more in the response; longest_repeat: longest word span occurring twice; "
                  "corpus_distinct_2: distinct bigrams of all responses pooled; unique_frac: distinct responses / "
                  "responses. Per-response values are averaged.", ""]
    judges = sorted(out.glob("judge*/summary.json"))
    if judges:
        parts += ["## Pairwise judge (both presentation orders)", "",
                  "| A | B | pairs | A wins / B wins / ties | A win rate | 95% CI | position bias | order agreement | "
                  "first-shown advantage (nats) | order-averaged margin win rate [CI] |", "|" + "---|" * 10]
        summaries = [json.loads(p.read_text(encoding="utf-8")) for p in judges]
        parts += [judge_line(s) for s in summaries]
        parts += ["", f"Judge: `{summaries[0]['judge']}` ({summaries[0]['judge_kind']}). A win needs both orders to "
                  "prefer A; a disagreement is a tie. Position bias: share of decisive single-order verdicts that "
                  "chose the response shown first (0.5 = none).", ""]
    timings = out / "timings.tsv"
    if timings.is_file():
        # the latest time of each stage (a later call redoes some stages and reuses the others)
        stages = dict(line.split("\t") for line in timings.read_text().splitlines() if line.strip())
        total = sum(float(v) for v in stages.values())
        parts += ["## Wall time", "", "| stage | seconds |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in stages.items()), f"| total | {total:.0f} |", ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynlab.evaluation.report", description=build_report.__doc__)
    parser.add_argument("out", help="the compare-extend output directory")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR", help="runs for the probe table")
    args = parser.parse_args(argv)
    runs = dict(r.split("=", 1) for r in args.run)
    out = Path(args.out)
    text = build_report(out, runs)
    write_text_atomic(out / "report.md", text)
    print(text)
    print(f"dynlab: wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
