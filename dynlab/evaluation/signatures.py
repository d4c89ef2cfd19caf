"""The paper's qualitative signatures (PAPER_NOTES.md §9, checks 4-16) decided from a set of runs' probe
trajectories: each check is a stated rule on the runs' mean curves, and comes out passed, failed or undecided (with
the reason: a missing run, probe type, column or evaluation is never a silent pass).

    from dynlab.evaluation.signatures import check_signatures, signature_table
    print(signature_table(check_signatures(["runs/sft/version_0", "runs/extend_sft/version_0",
                                            "runs/dpo/version_0", "runs/dpo/version_1"])))
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from dynlab.errors import InputError, redact
from dynlab.tracking.trajectory import KEY_COLUMNS, TRAJECTORY_DIR, read_trajectory

# Probe evaluation is teacher-forced and deterministic, so a mean curve moves only when the weights do; what is left
# is float32 summation order (~1e-5 nats on a sum over ~100 tokens, more with nondeterministic GPU reductions).
# 1e-3 nats is far above that and far below any change a check is about.
MONOTONE_TOL = 1e-3  # nats: the largest step-to-step fall check 4 still calls "non-decreasing"
SANITY_ATOL, SANITY_RTOL = 1e-4, 1e-5  # check 12: argmax_logp >= logp - (atol + rtol |logp|), float32 sums
UNIT_ATOL, UNIT_RTOL = 1e-6, 1e-5  # check 16: float32 rounding at the ends of each range
MUCH_MORE = 2.0  # check 9: "rejected falls much more than chosen" = its fall is at least this many times chosen's

MODULE_ROLES = {"SFTModule": "sft", "ExtendSFTModule": "extend"}  # DPOModule: "dpo" / "dpo_extend" by its parent
INVARIANTS = (12, 16)  # sanity checks: failing one is a bug or a NaN, not a signature too weak at this scale
ON_POLICY_ID = 15
# signature_curves' columns that are not probe types (besides the {type}_a_norm ones)
DERIVED = ("argmax", "chosen_energy", "chosen_p_e", "chosen_max_prob", "rejected_logp", "chosen_logp")

CLAIMS = {
    4: "SFT raises log π(chosen), monotonically",
    5: "SFT: the argmax y* rises, energy and p_e fall, every type's a_norm rises",
    6: "SFT: irr_train gains more than irr_test (hallucination)",
    7: "SFT: random_permute and random_nonhum gain less than chosen",
    8: "SFT: rejected rises early, stays below chosen, then plateaus or peaks",
    9: "DPO: the chosen − rejected margin rises; rejected falls much more than chosen",
    10: "DPO: log π(chosen) ends below its start",
    11: "DPO: the argmax y* rises while every other type falls and every a_norm rises (squeezing)",
    12: "argmax_logp ≥ logp for every probe row at every evaluation",
    13: "ExtendSFT ends with log π(rejected) above plain SFT's",
    14: "DPO from ExtendSFT: chosen drops less and y* rises less than DPO from SFT",
    15: "On-policy DPO: a weaker argmax rise and chosen drop than off-policy",
    16: "energy ∈ [0, 1], p_e ∈ [0, √2], a_norm ∈ [√(V−1), √(2V−2)]",
}
REFERENCES = {  # PAPER_NOTES §6-8
    4: "§6: SFT raises y⁺ a lot",
    5: "§6: under SFT the argmax rises while p_e and energy fall",
    6: "§8: Qwen-1.8B SFT: irr_train +21 nats, irr_test about +7, then falls back",
    7: "§6: under SFT the hum and random types fall",
    8: "§6: under SFT y⁻ rises early, then plateaus",
    9: "§6: under off-policy DPO y⁻ collapses",
    10: "§6: under off-policy DPO y⁺ may rise briefly, then ends below its start",
    11: "§6, §8: every other type falls while the argmax and a_norm rise (squeezing; the repeater)",
    12: "",
    13: "§7: after ExtendSFT, log π(y⁻) starts high",
    14: "§7: during DPO after ExtendSFT, y⁺ and the other types fall less and y* rises less",
    15: "§8: on-policy methods, or lifting y⁻ first, reduce squeezing",
    16: "",
}


@dataclass(frozen=True)
class Signature:
    """One decided (or undecidable) §9 check."""

    id: int  # the §9 number
    claim: str  # one short sentence
    passed: bool | None  # None = cannot be decided from these runs (reason in `detail`)
    numbers: dict[str, float]  # the numbers it was decided on, rounded to 5 significant digits
    reference: str  # the paper's reference where one exists (PAPER_NOTES §6-8), else ""
    runs: tuple[str, ...]  # roles (run_roles' keys) of the runs it used
    detail: str = ""  # how it was decided / why undecided


# ---------------------------------------------------------------------------------------------------------- runs


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_run_config(run_dir: str | os.PathLike, *, redacted: bool = False) -> tuple[str, dict]:
    """A run's config.yaml: its text (credentials redacted when ``redacted``, the mapping read from that text) and
    the mapping. An InputError naming the file when it is missing, not UTF-8, not YAML or not a mapping."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise InputError("not a run directory: no config.yaml (the resolved config `dynlab fit` writes)",
                         file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text ({err.reason} at byte {err.start})", file=str(path)) from None
    text = redact(text) if redacted else text
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"not readable YAML: {_first_line(err)}", file=str(path)) from None
    if not isinstance(config, dict):
        raise InputError("expected a mapping (the resolved config `dynlab fit` writes)", file=str(path))
    return text, config


def _config(run_dir: Path) -> dict:
    return read_run_config(run_dir)[1]


def _model_args(config: dict) -> tuple[str, dict]:
    """(the module's class name, its init_args) from a resolved config."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    class_path = model.get("class_path")
    init_args = model.get("init_args") if isinstance(model.get("init_args"), dict) else {}
    return (str(class_path).rsplit(".", 1)[-1] if class_path else "model"), init_args


def _check_trajectory(run_dir: Path) -> None:
    directory = run_dir / TRAJECTORY_DIR
    if not any(directory.glob("step_*.parquet")):
        raise InputError("no probe trajectory (step_*.parquet); was the run started with probe_every_n_steps: 0?",
                         file=str(directory))


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a Path if it is a run directory the checks and ``dynlab report`` can read (it exists, holds a
    readable config.yaml and a probe trajectory), else an InputError naming the path."""
    path = Path(run_dir)
    if not path.is_dir():
        raise InputError("no such run directory", file=str(path))
    read_run_config(path)
    _check_trajectory(path)
    return path


def load_trajectory(run_dir: str | os.PathLike) -> pd.DataFrame:
    """:func:`read_trajectory`, with a step file that is not readable parquet, or a trajectory without the key
    columns and ``logp``, an InputError naming the file (not a traceback)."""
    directory = Path(run_dir) / TRAJECTORY_DIR
    errors = (pa.ArrowException, OSError, ValueError)
    try:
        frame = read_trajectory(run_dir)
    except errors as err:
        for file in sorted(directory.glob("step_*.parquet")):
            try:
                pq.read_table(file)
            except errors as file_err:
                raise InputError(f"not a readable parquet file ({_first_line(file_err)})", file=str(file)) from None
        raise InputError(f"unreadable probe trajectory ({_first_line(err)})", file=str(directory)) from None
    if not frame.empty and (missing := [c for c in (*KEY_COLUMNS, "logp") if c not in frame]):
        raise InputError(f"the probe trajectory has no {', '.join(missing)} column", file=str(directory))
    return frame


def _dynlab_parent(init_from: str | None) -> str | None:
    """The module class of the dynlab run whose export or checkpoint (or directory) ``init_from`` is; ``"unknown"``
    when it names an ``export``/``checkpoints`` path that is not here (e.g. relative to another directory); None
    when it is no dynlab run's (null, a base model, a hub name)."""
    if not init_from:
        return None
    target = Path(str(init_from)).expanduser()
    cut = max((i for i, p in enumerate(target.parts) if p in ("export", "checkpoints")), default=None)
    base = target if cut is None else Path(*target.parts[:cut])
    if (base / "config.yaml").is_file():
        try:
            return _model_args(_config(base))[0]
        except InputError:
            return "unknown"
    return None if cut is None else "unknown"


def _parent(init_from: str | None, candidates: Sequence[Path]) -> Path | None:
    """The run among ``candidates`` whose export (or checkpoint) ``init_from`` is.

    A relative ``init_from`` was resolved against the directory that run was started from, which the config does
    not record: when it names no candidate from here, the candidate sharing the most trailing path components
    (at least ``<stage>/<version>``) with the part of ``init_from`` before ``export``/``checkpoints`` is taken,
    if it is the only one."""
    if not init_from:
        return None
    target = Path(str(init_from)).expanduser()
    resolved = target.resolve()
    for run in candidates:
        if resolved == run.resolve() or run.resolve() in resolved.parents:
            return run
    parts = target.parts
    cut = max((i for i, p in enumerate(parts) if p in ("export", "checkpoints")), default=len(parts))
    base = parts[:cut]

    def common_suffix(run: Path) -> int:
        mine = run.resolve().parts
        n = 0
        while n < min(len(base), len(mine)) and base[-1 - n] == mine[-1 - n]:
            n += 1
        return n

    scores = {run: common_suffix(run) for run in candidates}
    best = max(scores.values(), default=0)
    winners = [run for run, score in scores.items() if score == best]
    return winners[0] if best >= 2 and len(winners) == 1 else None


def run_roles(run_dirs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Roles from each run's config.yaml, in the order the runs were given.

    - ``sft``: the first ``SFTModule`` run; ``extend``: the first ``ExtendSFTModule`` run.
    - ``dpo``: the first ``DPOModule`` run whose ``model.init_args.init_from`` is the sft run's export (or a file in
      that run); if none is, the first DPO run started from no dynlab run (``init_from`` null or a base model: not
      an ``export``/``checkpoints`` path, nor a directory with a config.yaml) or from an SFTModule run not given
      here. A DPO run from any other run not given (an ExtendSFT run's export, an export path not found here) is
      never ``dpo``.
    - ``dpo_extend``: the first DPO run started from the extend run's export.
    - ``dpo_onpolicy``: the first DPO run whose rejected responses are sampled from the policy (``negatives:
      policy``, SPIN-style); ``dpo_online``: the first whose pairs are sampled and ranked (``pairs:
      policy_ranked``, online DPO); such runs are never ``dpo`` or ``dpo_extend`` (those are off-policy).
    - every other run: its module's class name and its position in ``run_dirs``, e.g. ``SFTModule_3``.

    Raises InputError (naming the file) for a directory without config.yaml or without a probe trajectory, or a
    directory given twice.
    """
    paths = [Path(p) for p in run_dirs]
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise InputError("run directory given twice", file=str(path))
        seen[path.resolve()] = path
    modules, on_policy, online = {}, [], []
    for path in paths:
        module, init_args = _model_args(_config(path))
        _check_trajectory(path)
        modules[path] = (module, init_args.get("init_from"))
        if module == "DPOModule" and init_args.get("negatives") == "policy":
            on_policy.append(path)
        if module == "DPOModule" and init_args.get("pairs") == "policy_ranked":
            online.append(path)
    role_of: dict[Path, str] = {}
    if on_policy:
        role_of[on_policy[0]] = "dpo_onpolicy"
    if online:
        role_of[online[0]] = "dpo_online"
    on_policy += online

    def first(module: str) -> Path | None:
        return next((p for p, (m, _) in modules.items() if m == module and p not in role_of), None)

    for module, role in MODULE_ROLES.items():
        if (path := first(module)) is not None:
            role_of[path] = role
    parents = {r: p for p, r in role_of.items()}
    dpo_runs = [p for p, (m, _) in modules.items() if m == "DPOModule" and p not in on_policy]
    parent_of = {p: _parent(modules[p][1], list(parents.values())) for p in dpo_runs}
    for role, parent in (("dpo", parents.get("sft")), ("dpo_extend", parents.get("extend"))):
        match = next((p for p in dpo_runs if parent is not None and parent_of[p] == parent), None)
        if match is not None:
            role_of[match] = role
    if "dpo" not in role_of.values():
        match = next((p for p in dpo_runs if p not in role_of and parent_of[p] is None
                      and _dynlab_parent(modules[p][1]) in (None, "SFTModule")), None)
        if match is not None:
            role_of[match] = "dpo"
    return {role_of.get(p, f"{modules[p][0]}_{i}"): p for i, p in enumerate(paths)}


# -------------------------------------------------------------------------------------------------------- curves


def _split_frame(run_dir: str | os.PathLike, split: str) -> pd.DataFrame:
    frame = load_trajectory(run_dir)
    if frame.empty:
        raise InputError("no probe rows in the trajectory", file=str(Path(run_dir) / TRAJECTORY_DIR))
    out = frame[frame["split"] == split]
    if out.empty:
        raise InputError(f"no probe rows of split {split!r} (it has {sorted(frame['split'].unique())})",
                         file=str(Path(run_dir) / TRAJECTORY_DIR))
    return out


def _delta(frame: pd.DataFrame, column: str) -> pd.Series:
    """``column`` minus its value at the first evaluation, per (type, row)."""
    first = frame[frame["step"] == frame["step"].min()].set_index(["type", "row"])[column]
    keys = pd.MultiIndex.from_frame(frame[["type", "row"]])
    return pd.Series(frame[column].to_numpy() - first.reindex(keys).to_numpy(), index=frame.index)


def _mean(values: pd.Series, by) -> pd.Series:
    """Mean per group, NaN where any of the group's values is NaN or ±inf: never averaged without them."""
    values = values.astype(float)
    grouped = values.where(np.isfinite(values)).groupby(by)
    return grouped.mean().where(grouped.count() == grouped.size())


def _nonfinite(values: pd.Series) -> int:
    return int((~np.isfinite(values.astype(float))).sum())


def _curves(frame: pd.DataFrame) -> pd.DataFrame:
    """The mean curves; ``attrs["nonfinite"]`` counts, per column, the NaN or ±inf values its means would read
    (their means are NaN, and a check reading that column is undecided)."""
    delta = _delta(frame, "logp")
    out = _mean(delta, [frame["step"], frame["type"]]).unstack("type")
    out.columns.name = None
    bad = {t: _nonfinite(v) for t, v in delta.groupby(frame["type"])}
    chosen = frame[frame["type"] == "chosen"]
    if "argmax_logp" in frame and not chosen.empty:
        argmax = _delta(chosen, "argmax_logp")
        out["argmax"], bad["argmax"] = _mean(argmax, chosen["step"]), _nonfinite(argmax)
    for metric in ("energy", "p_e", "max_prob"):
        if metric in frame and not chosen.empty:
            out[f"chosen_{metric}"] = _mean(chosen[metric], chosen["step"])
            bad[f"chosen_{metric}"] = _nonfinite(chosen[metric])
    if "a_norm" in frame:
        for ptype, values in frame.groupby("type")["a_norm"]:
            out[f"{ptype}_a_norm"], bad[f"{ptype}_a_norm"] = _mean(values, frame["step"]), _nonfinite(values)
    for ptype in ("rejected", "chosen"):
        if (frame["type"] == ptype).any():
            values = frame[frame["type"] == ptype]["logp"]
            out[f"{ptype}_logp"], bad[f"{ptype}_logp"] = _mean(values, frame["step"]), _nonfinite(values)
    out = out.sort_index()
    out.attrs["nonfinite"] = {column: n for column, n in bad.items() if n}
    return out


def signature_curves(run_dir: str | os.PathLike, split: str = "train") -> pd.DataFrame:
    """A run's mean curves over the probe rows of ``split``, indexed by step (every evaluation).

    Columns: each probe type (mean Δlog π since the first evaluation, per row, then averaged); ``argmax`` (the
    same for the teacher-forced argmax response y* along y⁺, ``argmax_logp`` of the chosen rows);
    ``chosen_energy``, ``chosen_p_e``, ``chosen_max_prob``; ``{type}_a_norm`` for every type (so ``chosen_a_norm``
    too); ``rejected_logp`` and ``chosen_logp`` (mean log π itself). A column whose type or metric the trajectory
    lacks is left out; a mean over a NaN or ±inf value is NaN (``attrs["nonfinite"]`` counts them per column).
    Raises InputError when the run has no probe rows of ``split``.
    """
    return _curves(_split_frame(run_dir, split))


# -------------------------------------------------------------------------------------------------------- checks


def _round(x: float) -> float:
    x = float(x)
    return float(f"{x:.5g}") if math.isfinite(x) else x


def _sig(check: int, runs: Iterable[str], passed: bool | None | dict[str, bool | None], numbers: dict,
         detail: str) -> Signature:
    """A Signature; ``passed`` may be named parts, ANDed three-valued (a failed part fails the check, else an
    undecided part leaves it undecided), the failed and undecided ones named in the detail."""
    if isinstance(passed, dict):
        parts = {name: None if p is None else bool(p) for name, p in passed.items()}
        for label, value in (("failed", False), ("undecided", None)):
            if names := [name for name, p in parts.items() if p is value]:
                detail += f"; {label}: {', '.join(names)}"
        values = list(parts.values())
        passed = False if False in values else None if None in values else True
    return Signature(check, CLAIMS[check], None if passed is None else bool(passed),
                     {k: _round(v) for k, v in numbers.items()}, REFERENCES[check], tuple(runs), detail)


def _missing(curves: pd.DataFrame, columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c not in curves or curves[c].isna().all()]


def _need(check: int, role: str, curves: dict[str, pd.DataFrame], columns: Sequence[str],
          min_evals: int = 2) -> Signature | None:
    """The undecided Signature if ``role`` is missing, has a NaN or ±inf value in a column's rows, lacks a column,
    has no evaluation at step 0 or too few evaluations; else None."""
    if role not in curves:
        return _sig(check, (), None, {}, f"needs the {role!r} run (see run_roles); none among these runs")
    c = curves[role]
    if bad := {col: n for col in columns if (n := c.attrs.get("nonfinite", {}).get(col, 0))}:
        return _sig(check, (role,), None, {f"non-finite {col}": n for col, n in bad.items()},
                    f"the {role} run has NaN or ±inf values in its {', '.join(bad)} rows: their mean is undefined, "
                    "so the check is undecided (never averaged without them)")
    if missing := _missing(c, columns):
        return _sig(check, (role,), None, {}, f"the {role} run has no {', '.join(missing)} (type or metric "
                                              "missing from its trajectory)")
    if len(c.index) and c.index.min() != 0:
        return _sig(check, (role,), None, {}, f"the {role} run's trajectory starts at step {c.index.min()}, not 0 "
                                              "(started from a checkpoint, or its first files lost): a change from its "
                                              "first evaluation is not the change since the start")
    if len(c.index) < min_evals:
        return _sig(check, (role,), None, {}, f"needs at least {min_evals} evaluations, the {role} run has "
                                              f"{len(c.index)}")
    return None


def _bad(curves: pd.DataFrame, column: str) -> int:
    """How many NaN or ±inf values the means of ``column`` read (see :func:`_curves`)."""
    return curves.attrs.get("nonfinite", {}).get(column, 0)


def _a_norm_part(c: pd.DataFrame) -> tuple[str, bool | None, dict]:
    """Checks 5 and 11's "every type's mean a_norm rises": the part's name, its value and numbers. A type whose
    a_norm rows hold a NaN or ±inf leaves it undecided (named), unless another type's a_norm fails it."""
    columns = [col for col in c.columns if col.endswith("_a_norm")]
    bad = [col.removesuffix("_a_norm") for col in columns if _bad(c, col)]
    a_norm = {col.removesuffix("_a_norm"): _first_last(c[col]) for col in columns
              if not _bad(c, col) and c[col].notna().any()}
    flat = [t for t, (a, b) in a_norm.items() if not b > a]
    name = ("every a_norm rises" + (f" (not: {', '.join(flat)})" if flat else "")
            + (f" (NaN or ±inf: {', '.join(bad)})" if bad else "") + ("" if a_norm or bad else " (no a_norm column)"))
    value = False if flat else None if bad or not a_norm else True
    return name, value, {f"Δ a_norm {t}": b - a for t, (a, b) in a_norm.items()}


def _first_last(series: pd.Series) -> tuple[float, float]:
    values = series.dropna()
    return float(values.iloc[0]), float(values.iloc[-1])


def _check_4(curves) -> Signature:
    if undecided := _need(4, "sft", curves, ["chosen"]):
        return undecided
    chosen = curves["sft"]["chosen"].dropna()
    worst_fall = min(0.0, float(chosen.diff().min()))
    end = float(chosen.iloc[-1])
    return _sig(4, ("sft",), end > 0 and worst_fall >= -MONOTONE_TOL,
                {"Δ chosen": end, "largest fall between evals": worst_fall, "evals": len(chosen)},
                f"rule: mean Δ chosen at the last eval (step {chosen.index[-1]}) > 0 and no fall between consecutive "
                f"evals larger than {MONOTONE_TOL} nats (float32 summation noise is ~1e-5)")


def _check_5(curves) -> Signature:
    if undecided := _need(5, "sft", curves, ["argmax", "chosen_energy", "chosen_p_e"]):
        return undecided
    c = curves["sft"]
    argmax = _first_last(c["argmax"])[1]
    energy, p_e = _first_last(c["chosen_energy"]), _first_last(c["chosen_p_e"])
    a_name, a_value, a_numbers = _a_norm_part(c)
    numbers = {"Δ argmax": argmax, "energy start": energy[0], "energy end": energy[1], "p_e start": p_e[0],
               "p_e end": p_e[1], **a_numbers}
    parts = {"argmax rises": argmax > 0, "energy falls": energy[1] < energy[0], "p_e falls": p_e[1] < p_e[0],
             a_name: a_value}
    return _sig(5, ("sft",), parts, numbers,
                "rule: mean Δ argmax (chosen's argmax_logp) > 0 at the last eval, chosen's mean energy and p_e lower "
                "than at the first eval, every type's mean a_norm higher"
                + ("" if a_numbers else " (no a_norm column)"))


def _check_6(curves, roles: dict[str, Path]) -> Signature:
    if undecided := _need(6, "sft", curves, ["irr_train", "irr_test"]):
        return undecided
    data = _config(roles["sft"]).get("data")
    data = data.get("init_args") if isinstance(data, dict) and isinstance(data.get("init_args"), dict) else {}
    source = data.get("source", "synthetic")  # ProbeDataModule's default
    if data.get("rebuild_irr_train") is not True and source != "synthetic":
        return _sig(6, ("sft",), None, {},
                    f"irr_train responses taken from the data (source {source!r}, data.init_args.rebuild_irr_train "
                    "not true): trained on only if they are training rows' chosen responses, which the run does not "
                    "record; decided only with rebuild_irr_train: true or the synthetic source (both build irr_train "
                    "from the training rows)")
    last = curves["sft"].iloc[-1]
    return _sig(6, ("sft",), last["irr_train"] > last["irr_test"],
                {"Δ irr_train": last["irr_train"], "Δ irr_test": last["irr_test"]},
                "rule: mean Δ irr_train > mean Δ irr_test at the last eval (irr_train's responses are other training "
                "prompts' chosen responses, so SFT trained on them)")


def _check_7(curves) -> Signature:
    if undecided := _need(7, "sft", curves, ["chosen"]):
        return undecided
    c = curves["sft"]
    last = c.iloc[-1]
    present = [t for t in ("random_permute", "random_nonhum") if t in last and not pd.isna(last[t])]
    parts = {f"{t} below chosen" + ("" if t in present else f" (NaN or ±inf in {t})" if _bad(c, t) else f" (no {t})"):
             last[t] < last["chosen"] if t in present else None for t in ("random_permute", "random_nonhum")}
    return _sig(7, ("sft",), parts, {"Δ chosen": last["chosen"], **{f"Δ {t}": last[t] for t in present}},
                "rule: mean Δ random_permute and mean Δ random_nonhum each < mean Δ chosen at the last eval")


def _check_8(curves) -> Signature:
    if undecided := _need(8, "sft", curves, ["chosen", "rejected"], min_evals=3):
        return undecided
    c = curves["sft"][["chosen", "rejected"]].dropna()
    steps = c.index.to_numpy(dtype=float)
    rejected = c["rejected"].to_numpy(dtype=float)
    mid = (steps[0] + steps[-1]) / 2
    r_mid = float(np.interp(mid, steps, rejected))  # linear between evaluations
    rise_first, rise_second = r_mid - rejected[0], rejected[-1] - r_mid
    early = [i for i in range(1, len(steps)) if steps[i] <= mid] or [1]
    early_max = max(rejected[i] for i in early)
    gap = (c["chosen"] - c["rejected"]).iloc[1:]
    peak_before_end = int(rejected.argmax()) < len(rejected) - 1
    parts = {"rises early": early_max > 0, "below chosen": bool((gap > 0).all()),
             "plateaus or peaks": rise_second < rise_first or peak_before_end}
    return _sig(8, ("sft",), parts,
                {"Δ rejected early max": early_max, "Δ rejected end": rejected[-1],
                 "smallest Δ chosen − Δ rejected": float(gap.min()), "rise 1st half": rise_first,
                 "rise 2nd half": rise_second, "Δ rejected max step": float(steps[int(rejected.argmax())])},
                f"rule: mean Δ rejected > 0 at some eval in the first half (steps ≤ {mid:g}); < mean Δ chosen at "
                "every eval after the first; plateau or peak = its rise over the second half of the steps (linear "
                "between evals) smaller than over the first, or its maximum before the last eval")


def _check_9(curves) -> Signature:
    if undecided := _need(9, "dpo", curves, ["chosen", "rejected"]):
        return undecided
    last = curves["dpo"].iloc[-1]
    chosen, rejected = float(last["chosen"]), float(last["rejected"])
    margin = chosen - rejected
    parts = {"margin rises": margin > 0,
             "rejected falls much more": rejected < 0 and -rejected >= MUCH_MORE * max(0.0, -chosen)}
    return _sig(9, ("dpo",), parts,
                {"Δ chosen": chosen, "Δ rejected": rejected, "Δ margin": margin},
                f"rule: at the last eval mean Δ chosen − mean Δ rejected > 0, and rejected falls (Δ < 0) by at least "
                f"{MUCH_MORE:g}× chosen's fall (any fall when chosen did not fall)")


def _check_10(curves) -> Signature:
    if undecided := _need(10, "dpo", curves, ["chosen"]):
        return undecided
    chosen = curves["dpo"]["chosen"].dropna()
    return _sig(10, ("dpo",), chosen.iloc[-1] < 0,
                {"Δ chosen end": chosen.iloc[-1], "Δ chosen max": chosen.max(), "max at step": chosen.idxmax()},
                "rule: mean log π(chosen) at the last eval < at the first (mean Δ chosen < 0); a rise before is "
                "allowed")


def _check_11(curves) -> Signature:
    if undecided := _need(11, "dpo", curves, ["argmax"]):
        return undecided
    c = curves["dpo"]
    types = [col for col in c.columns if col not in DERIVED and not col.endswith("_a_norm") and col != "chosen"]
    bad = [t for t in types if _bad(c, t)]
    others = {t: _first_last(c[t])[1] for t in types if t not in bad and c[t].notna().any()}
    argmax = _first_last(c["argmax"])[1]
    rising = [t for t, v in others.items() if not v < 0]
    a_name, a_value, a_numbers = _a_norm_part(c)
    others_name = ("every other type falls" + (f" (not: {', '.join(rising)})" if rising else "")
                   + (f" (NaN or ±inf: {', '.join(bad)})" if bad else "")
                   + ("" if others or bad else " (no other type)"))
    parts = {"argmax rises": argmax > 0,
             others_name: False if rising else None if bad or not others else True, a_name: a_value}
    detail = (f"rule: mean Δ argmax > 0 at the last eval; mean Δ < 0 there for every type but chosen "
              f"({', '.join(others) or 'none present'}); every type's mean a_norm higher than at the first eval")
    return _sig(11, ("dpo",), parts, {"Δ argmax": argmax, **{f"Δ {t}": v for t, v in others.items()}, **a_numbers},
                detail)


def _check_12(role: str, frame: pd.DataFrame) -> Signature:
    if "argmax_logp" not in frame or not (frame["type"] == "chosen").any():
        return _sig(12, (role,), None, {}, "needs the chosen rows' argmax_logp and logp in the trajectory")
    values = frame[["argmax_logp", "logp"]].astype(float)
    finite = np.isfinite(values).all(axis=1)
    nonfinite, rows = int((~finite).sum()), values[finite]
    rule = (f"rule: argmax_logp ≥ logp − ({SANITY_ATOL:g} + {SANITY_RTOL:g}·|logp|) on every row (every type, every "
            "eval) of the split, both finite; both are float32 sums over the same tokens")
    if values.empty:
        return _sig(12, (role,), None, {"rows": 0}, "no probe rows to check; " + rule)
    gap = rows["argmax_logp"] - rows["logp"]
    tol = SANITY_ATOL + SANITY_RTOL * rows["logp"].abs()
    bad = int((gap < -tol).sum())
    numbers = {"rows": len(values), "violations": bad, "non-finite": nonfinite}
    if not rows.empty:
        numbers["min argmax − logp"] = gap.min()
    return _sig(12, (role,), bad == 0 and nonfinite == 0, numbers,
                rule + (f"; {nonfinite} rows with a NaN or ±inf argmax_logp or logp" if nonfinite else ""))


def _vocab_size(run_dir: Path) -> tuple[int | None, str]:
    """V (the logits' size) from a model config.json: the run's export, else its init_from or its policy path when
    that is a local model directory. (V is the output layer's size; the trajectory does not store it.)"""
    _, init_args = _model_args(_config(run_dir))
    policy = init_args.get("policy") if isinstance(init_args.get("policy"), dict) else {}
    for where in (run_dir / "export", init_args.get("init_from"), policy.get("name_or_path")):
        if not where:
            continue
        path = Path(str(where)).expanduser() / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if isinstance(vocab, int) and vocab > 1:
            return vocab, str(path)
    return None, ""


def _check_16(role: str, run_dir: Path, frame: pd.DataFrame) -> Signature:
    numbers, parts = {}, {}

    def within(column: str, low: float, high: float, name: str) -> None:
        if column not in frame:
            parts[f"{name} (no {column} column)"] = None
            return
        values = frame[column].astype(float)
        finite = values[np.isfinite(values)]
        if nonfinite := len(values) - len(finite):
            numbers[f"{column} non-finite"] = nonfinite
            name += f" ({nonfinite} NaN or ±inf)"
        if finite.empty:
            parts[name] = False if nonfinite else None
            return
        numbers[f"{column} min"], numbers[f"{column} max"] = finite.min(), finite.max()
        parts[name] = not nonfinite and finite.min() >= low and finite.max() <= high

    within("energy", -UNIT_ATOL, 1 + UNIT_ATOL, "energy in [0, 1]")
    within("p_e", -UNIT_ATOL, math.sqrt(2) * (1 + UNIT_RTOL), "p_e in [0, √2]")
    vocab, source = _vocab_size(run_dir)
    if vocab is None:
        parts["a_norm in range (vocabulary size unknown: no config.json in the run's export, its init_from or its "
              "policy directory)"] = None
    else:
        numbers["V"] = vocab
        low, high = math.sqrt(vocab - 1), math.sqrt(2 * vocab - 2)
        within("a_norm", low * (1 - UNIT_RTOL), high * (1 + UNIT_RTOL), f"a_norm in [{low:.6g}, {high:.6g}]")
    return _sig(16, (role,), parts, numbers,
                f"rule: every row (every type, every eval) of the split finite and within the ranges, relative "
                f"tolerance {UNIT_RTOL:g} for float32" + (f"; V from {source}" if source else ""))


def probe_texts(run: str | os.PathLike, split: str) -> list[dict] | None:
    """The probe rows a run scored (``probes/probe_{split}.jsonl``), None if the file is missing or unreadable."""
    path = Path(run) / "probes" / f"probe_{split}.jsonl"
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


def _same_probe_texts(split: str, *runs: Path) -> bool | None:
    """Whether the runs scored the same probe texts (probes/probe_{split}.jsonl); None when a file is missing."""
    texts = [probe_texts(run, split) for run in runs]
    return None if any(t is None for t in texts) else all(t == texts[0] for t in texts)


def _check_13(roles: dict[str, Path], frames: dict[str, pd.DataFrame], split: str) -> Signature:
    for role in ("sft", "extend"):
        if role not in frames:
            return _sig(13, (), None, {}, f"needs the {role!r} run (see run_roles); none among these runs")
        if not (frames[role]["type"] == "rejected").any():
            return _sig(13, (role,), None, {}, f"the {role} run has no rejected rows")
        if n := _nonfinite(frames[role][frames[role]["type"] == "rejected"]["logp"]):
            return _sig(13, (role,), None, {f"non-finite {role} rejected logp": n},
                        f"the {role} run has NaN or ±inf log π(rejected) values: undecided (never averaged without "
                        "them)")
    if _same_probe_texts(split, roles["sft"], roles["extend"]) is False:
        return _sig(13, ("sft", "extend"), None, {}, f"the two runs scored different probe texts (probe_{split}.jsonl)")
    at = {}
    for role in ("sft", "extend"):
        rejected = frames[role][frames[role]["type"] == "rejected"]
        at[role] = {s: rejected[rejected["step"] == s].set_index("row")["logp"]
                    for s in (rejected["step"].min(), rejected["step"].max())}
    end = pd.concat({r: list(at[r].values())[-1] for r in at}, axis=1).dropna()
    start = pd.concat({r: list(at[r].values())[0] for r in at}, axis=1).dropna()
    if end.empty:
        return _sig(13, ("sft", "extend"), None, {}, "the two runs share no probe row")
    diff = float((end["extend"] - end["sft"]).mean())
    return _sig(13, ("sft", "extend"), diff > 0,
                {"logp rejected sft end": end["sft"].mean(), "logp rejected extend end": end["extend"].mean(),
                 "extend − sft end": diff, "extend − sft start": (start["extend"] - start["sft"]).mean(),
                 "rows": len(end)},
                "rule: over the probe rows both runs scored, mean (extend − sft) log π(rejected) at each run's last "
                "eval > 0 (the start difference shows whether both began from the same weights)")


def _check_14(curves) -> Signature:
    for role in ("dpo", "dpo_extend"):
        if undecided := _need(14, role, curves, ["chosen", "argmax"]):
            return undecided
    base, ext = (curves[r][["chosen", "argmax"]].dropna() for r in ("dpo", "dpo_extend"))
    common = base.index.intersection(ext.index)
    if len(common) < 2:
        return _sig(14, ("dpo", "dpo_extend"), None, {}, "the two DPO runs share fewer than 2 evaluation steps")
    step = common.max()
    b, e = base.loc[step], ext.loc[step]
    return _sig(14, ("dpo", "dpo_extend"), {"chosen drops less": e["chosen"] > b["chosen"],
                                                    "argmax rises less": e["argmax"] < b["argmax"]},
                {"step": step, "Δ chosen dpo": b["chosen"], "Δ chosen dpo_extend": e["chosen"],
                 "Δ argmax dpo": b["argmax"], "Δ argmax dpo_extend": e["argmax"]},
                f"rule: at the last step both DPO runs evaluated (step {step}): mean Δ chosen of dpo_extend > of dpo "
                "(a smaller drop) and mean Δ argmax of dpo_extend < of dpo (a smaller rise)")


def _check_15(curves, roles: dict[str, Path], split: str) -> Signature:
    runs = ("dpo", "dpo_onpolicy")
    for role in runs:
        if undecided := _need(15, role, curves, ["chosen", "argmax"]):
            if role == "dpo_onpolicy" and role not in curves:
                return _sig(15, (), None, {}, "needs an on-policy DPO run (negatives: policy, y⁻ sampled from the "
                                              "current policy) to compare with an off-policy one")
            return undecided
    starts = {role: _model_args(_config(roles[role]))[1].get("init_from") for role in runs}
    same = {os.path.normpath(os.path.expanduser(str(v))) if v is not None else None for v in starts.values()}
    if len(same) != 1:
        return _sig(15, runs, None, {}, f"the two DPO runs start from different models ({starts['dpo']} and "
                                        f"{starts['dpo_onpolicy']}): their changes do not compare")
    if _same_probe_texts(split, roles["dpo"], roles["dpo_onpolicy"]) is False:
        return _sig(15, runs, None, {}, f"the two DPO runs scored different probe texts (probes/probe_{split}.jsonl)")
    off, on = (curves[r][["chosen", "argmax"]].dropna() for r in runs)
    common = off.index.intersection(on.index)
    if len(common) < 2:
        return _sig(15, runs, None, {}, "the two DPO runs share fewer than 2 evaluation steps")
    step = common.max()
    o, n = off.loc[step], on.loc[step]
    return _sig(15, runs, {"argmax rises less": n["argmax"] < o["argmax"],
                           "chosen drops less": n["chosen"] > o["chosen"]},
                {"step": step, "Δ argmax dpo": o["argmax"], "Δ argmax dpo_onpolicy": n["argmax"],
                 "Δ chosen dpo": o["chosen"], "Δ chosen dpo_onpolicy": n["chosen"]},
                f"rule: from the same start, at the last step both evaluated (step {step}): mean Δ argmax of "
                "dpo_onpolicy < of dpo (a weaker squeeze) and mean Δ chosen of dpo_onpolicy > of dpo (a smaller drop)")


def check_signatures(run_dirs: Sequence[str | os.PathLike], split: str = "train") -> list[Signature]:
    """Every §9 check a set of runs can decide, in §9 order: 4-11 and 13-15 once (undecided, with the reason, when
    a run they need is missing; 15 needs an on-policy DPO run beside the off-policy one), 12 and 16 once per run.
    Runs are named by their role (:func:`run_roles`); means are over the probe rows of ``split``."""
    roles = run_roles(run_dirs)
    frames = {role: _split_frame(path, split) for role, path in roles.items()}
    curves = {role: _curves(frame) for role, frame in frames.items()}
    out = [_check_4(curves), _check_5(curves), _check_6(curves, roles), _check_7(curves), _check_8(curves),
           _check_9(curves), _check_10(curves), _check_11(curves)]
    out += [_check_12(role, frame) for role, frame in frames.items()]
    out += [_check_13(roles, frames, split), _check_14(curves), _check_15(curves, roles, split)]
    out += [_check_16(role, roles[role], frame) for role, frame in frames.items()]
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def result_word(signature: Signature) -> str:
    """A result in words, the one wording of :func:`signature_table` and ``dynlab report``: the invariants (12, 16)
    "pass" or "FAIL" (a failure is a bug or a NaN); the paper's signatures "shown" or "not shown (at this scale)";
    an undecided check "undecided"."""
    if signature.passed is None:
        return "undecided"
    if signature.id in INVARIANTS:
        return "pass" if signature.passed else "FAIL"
    return "shown" if signature.passed else "not shown (at this scale)"


def format_numbers(numbers: dict[str, float]) -> list[str]:
    """A Signature's numbers as ``name = value`` (up to 6 significant digits; they are rounded to 5)."""
    return [f"{k} = {v:g}" for k, v in numbers.items()]


def signature_table(signatures: Sequence[Signature]) -> str:
    """A markdown table (§, claim, runs, result, numbers, reference), then a note for each failed or undecided
    check saying how it was decided or why it could not be."""
    lines = ["| § | claim | runs | result | numbers | reference |", "|---|---|---|---|---|---|"]
    for s in signatures:
        numbers = ", ".join(format_numbers(s.numbers))
        lines.append("| " + " | ".join(_cell(x) for x in (s.id, s.claim, ", ".join(s.runs) or "–", result_word(s),
                                                            numbers or "–", s.reference or "–")) + " |")
    notes = [f"- §{s.id} ({', '.join(s.runs) or 'no run'}), {result_word(s)}: {s.detail}"
             for s in signatures if s.passed is not True and s.detail]
    return "\n".join(lines + ([""] + notes if notes else []))
