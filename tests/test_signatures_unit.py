"""dynlab.evaluation.signatures on hand-built run directories (a config.yaml like the CLI writes, trajectory files
through write_step) with curves that do and do not show each PAPER_NOTES §9 signature, and once on a real tiny
`dynlab fit`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from dynlab.errors import InputError
from dynlab.evaluation.signatures import (
    Signature,
    check_signatures,
    result_word,
    run_roles,
    signature_curves,
    signature_table,
)
from dynlab.tracking.trajectory import write_step
from tests.conftest import CONFIGS, run_dir_of, run_dynlab

STEPS = (0, 8, 16, 24)
OFFSETS = (-1.5, -0.5, 0.5, 1.5)  # per-row offsets, constant over steps: each row's Δ is the curve, mean offset 0
VOCAB = 100  # a_norm in [sqrt(99), sqrt(198)] = [9.95, 14.07]

SFT = {"chosen": [0, 5, 9, 12], "rejected": [0, 3, 4, 4.2], "irr_train": [0, 2, 3, 4], "irr_test": [0, 1, 1.5, 2],
       "random_permute": [0, -1, -2, -3], "random_nonhum": [0, -1, -2, -4], "argmax": [0, 1, 2, 3]}
DPO = {"chosen": [0, 0.5, -1, -3], "rejected": [0, -10, -20, -30], "irr_train": [0, -1, -2, -3],
       "irr_hum": [0, -2, -3, -5], "random_nonhum": [0, -1, -1, -2], "argmax": [0, 1, 3, 6]}
RISING_A_NORM = [10.0, 11.0, 12.0, 13.0]


def write_run(root: Path, name: str, module: str, curves: dict, *, init_from: str | None = None,
              steps=STEPS, vocab: int | None = VOCAB, a_norm: dict | None = None, chosen: dict | None = None,
              drop: tuple[str, ...] = (), rows: dict | None = None, probe_text: str = "same",
              data: dict | None = None, negatives: str | None = None, pairs: str | None = None) -> Path:
    """A run directory: ``curves`` maps each probe type (and ``argmax``) to its mean Δ per step; ``a_norm`` per
    type (default rising), ``chosen`` the chosen rows' energy/p_e/max_prob curves (default: falling, falling,
    rising); ``drop`` leaves columns out; ``rows`` overrides single cells {(step, type, row): {column: value}};
    ``data`` the data module's init_args (default ``source: synthetic``); ``negatives`` and ``pairs`` DPO's."""
    run = root / name
    init_args = {"policy": {"name_or_path": "tiny"}, "init_from": init_from}
    if negatives is not None:
        init_args["negatives"] = negatives
    if pairs is not None:
        init_args["pairs"] = pairs
    config = {"seed_everything": 0, "trainer": {"max_steps": steps[-1]},
              "model": {"class_path": f"dynlab.modules.{module}", "init_args": init_args},
              "data": {"class_path": "dynlab.data.ProbeDataModule", "init_args": data or {"source": "synthetic"}}}
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("# lightning.pytorch==2.6.6\n" + yaml.safe_dump(config), encoding="utf-8")
    if vocab is not None:
        (run / "export").mkdir()
        (run / "export" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab}))
    (run / "probes").mkdir()
    (run / "probes" / "probe_train.jsonl").write_text(json.dumps({"prompt": probe_text}) + "\n")
    chosen = {"energy": [0.9, 0.8, 0.7, 0.6], "p_e": [1.2, 1.1, 1.0, 0.9], "max_prob": [0.1, 0.2, 0.3, 0.4],
              **(chosen or {})}
    types = [t for t in curves if t != "argmax"]
    for i, step in enumerate(steps):
        records = []
        for split in ("train", "test"):
            for t in types:
                for row, offset in enumerate(OFFSETS):
                    record = {"split": split, "type": t, "row": row, "logp": -60.0 + offset + curves[t][i],
                              "argmax_logp": -10.0 + offset + curves.get("argmax", [0] * len(steps))[i],
                              "a_norm": (a_norm or {}).get(t, RISING_A_NORM)[i], "energy": 0.5, "p_e": 0.7,
                              "max_prob": 0.3}
                    if t == "chosen":
                        record.update({m: v[i] for m, v in chosen.items()})
                    record.update((rows or {}).get((step, t, row), {}))
                    records.append({k: v for k, v in record.items() if k not in drop})
        write_step(run, step, records)
    return run


def by_id(signatures: list[Signature], check: int, run: str | None = None) -> Signature:
    found = [s for s in signatures if s.id == check and (run is None or run in s.runs)]
    assert len(found) == 1, found
    return found[0]


def check(tmp_path: Path, check_id: int, *runs: tuple, **kwargs) -> Signature:
    """check_signatures on runs given as (name, module, curves, options) and the one Signature of ``check_id``."""
    dirs = [write_run(tmp_path, name, module, curves, **opts) for name, module, curves, opts in runs]
    return by_id(check_signatures(dirs, **kwargs), check_id)


def changed(curves: dict, **columns) -> dict:
    return {**curves, **columns}


def sft(curves=SFT, **opts):
    return ("sft", "SFTModule", curves, opts)


def dpo(curves=DPO, name="dpo", **opts):
    return (name, "DPOModule", curves, {"init_from": None, **opts})


# ---------------------------------------------------------------------------------------------------- run_roles


def test_run_roles_from_configs_and_init_from(tmp_path: Path) -> None:
    base = write_run(tmp_path, "runs/sft/version_0", "SFTModule", SFT)
    ext = write_run(tmp_path, "runs/extend_sft/version_0", "ExtendSFTModule", SFT)
    d_ext = write_run(tmp_path, "runs/dpo/version_0", "DPOModule", DPO, init_from=str(ext / "export"))
    # relative, as typed on the command line in another directory: matched by its trailing components
    d_base = write_run(tmp_path, "runs/dpo/version_1", "DPOModule", DPO, init_from="runs/sft/version_0/export")
    other_sft = write_run(tmp_path, "runs/sft/version_1", "SFTModule", SFT)
    other_dpo = write_run(tmp_path, "runs/dpo/version_2", "DPOModule", DPO, init_from="/elsewhere/model")
    roles = run_roles([base, ext, d_ext, d_base, other_sft, other_dpo])
    assert roles == {"sft": base, "extend": ext, "dpo_extend": d_ext, "dpo": d_base, "SFTModule_4": other_sft,
                     "DPOModule_5": other_dpo}


def test_run_roles_on_policy_runs_are_never_the_off_policy_dpo(tmp_path: Path) -> None:
    base = write_run(tmp_path, "sft", "SFTModule", SFT)
    start = str(base / "export")
    online = write_run(tmp_path, "online", "DPOModule", DPO, init_from=start, pairs="policy_ranked")
    spin = write_run(tmp_path, "spin", "DPOModule", DPO, init_from=start, negatives="policy")
    sppo = write_run(tmp_path, "sppo", "DPOModule", DPO, init_from=start)
    off = write_run(tmp_path, "off", "DPOModule", DPO, init_from=start)
    assert run_roles([base, online, spin, off, sppo]) == {"sft": base, "dpo_online": online, "dpo_onpolicy": spin,
                                                          "dpo": off, "DPOModule_4": sppo}


def test_run_roles_any_dpo_run_without_a_matching_parent_is_dpo(tmp_path: Path) -> None:
    d0 = write_run(tmp_path, "dpo0", "DPOModule", DPO, init_from="/from/the/base/model")
    d1 = write_run(tmp_path, "dpo1", "DPOModule", DPO)
    assert run_roles([d0, d1]) == {"dpo": d0, "DPOModule_1": d1}
    # a checkpoint inside the sft run is that run too
    base = write_run(tmp_path, "base", "SFTModule", SFT)
    d2 = write_run(tmp_path, "dpo2", "DPOModule", DPO, init_from=str(base / "checkpoints" / "last.ckpt"))
    assert run_roles([d0, base, d2]) == {"DPOModule_0": d0, "sft": base, "dpo": d2}


def test_run_roles_a_dpo_run_from_another_dynlab_run_is_never_the_baseline_dpo(tmp_path: Path) -> None:
    base = write_run(tmp_path, "runs/sft/version_0", "SFTModule", SFT)
    ext = write_run(tmp_path, "runs/extend_sft/version_0", "ExtendSFTModule", SFT)  # on disk, not given
    from_ext = write_run(tmp_path, "runs/dpo/from-extend", "DPOModule", DPO, init_from=str(ext / "export"))
    assert run_roles([base, from_ext]) == {"sft": base, "DPOModule_1": from_ext}
    from_ckpt = write_run(tmp_path, "runs/dpo/from-ckpt", "DPOModule", DPO,
                          init_from=str(ext / "checkpoints" / "last.ckpt"))
    # an export path that is not here (relative to another directory) may be any run's: not the baseline either
    elsewhere = write_run(tmp_path, "runs/dpo/elsewhere", "DPOModule", DPO, init_from="other/extend/version_3/export")
    from_base_model = write_run(tmp_path, "runs/dpo/from-base", "DPOModule", DPO, init_from=str(tmp_path / "hf"))
    assert run_roles([from_ckpt, elsewhere, from_base_model]) == {
        "DPOModule_0": from_ckpt, "DPOModule_1": elsewhere, "dpo": from_base_model}
    # SFT -> DPO with the SFT run not given is still the baseline recipe
    from_sft = write_run(tmp_path, "runs/dpo/from-sft", "DPOModule", DPO, init_from=str(base / "export"))
    assert run_roles([from_ext, from_sft]) == {"DPOModule_0": from_ext, "dpo": from_sft}


def test_a_run_without_step_0_decides_no_change_since_the_start(tmp_path: Path) -> None:
    late = check(tmp_path, 4, sft({t: v[1:] for t, v in SFT.items()}, steps=STEPS[1:]))
    assert late.passed is None and "starts at step 8, not 0" in late.detail


def test_run_roles_an_ambiguous_relative_init_from_matches_no_run(tmp_path: Path) -> None:
    base = write_run(tmp_path, "a/sft/version_0", "SFTModule", SFT)
    ext = write_run(tmp_path, "b/sft/version_0", "ExtendSFTModule", SFT)  # the same trailing components
    first = write_run(tmp_path, "dpo0", "DPOModule", DPO)
    ambiguous = write_run(tmp_path, "dpo1", "DPOModule", DPO, init_from="sft/version_0/export")
    assert run_roles([base, ext, first, ambiguous]) == {"sft": base, "extend": ext, "dpo": first,
                                                        "DPOModule_3": ambiguous}


def test_run_roles_refuses_a_directory_without_config_or_trajectory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"config\.yaml"):
        run_roles([tmp_path])
    run = write_run(tmp_path, "run", "SFTModule", SFT)
    for f in (run / "probes" / "trajectory").glob("*.parquet"):
        f.unlink()
    with pytest.raises(InputError, match=r"probes/trajectory.*no probe trajectory"):
        run_roles([run])
    (run / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(InputError, match=r"config\.yaml.*YAML"):
        run_roles([run])


def test_unreadable_run_files_are_input_errors_naming_them(tmp_path: Path) -> None:
    run = write_run(tmp_path, "run", "SFTModule", SFT)
    step = sorted((run / "probes" / "trajectory").glob("*.parquet"))[1]
    data = step.read_bytes()
    step.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=rf"{step.name}.*not a readable parquet file"):
        check_signatures([run])
    step.write_bytes(data)
    (run / "config.yaml").write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(InputError, match=r"config\.yaml.*not UTF-8"):
        run_roles([run])
    no_logp = write_run(tmp_path, "no_logp", "SFTModule", SFT, drop=("logp",))
    with pytest.raises(InputError, match=r"trajectory.*no logp column"):
        check_signatures([no_logp])


def test_unknown_split_is_an_input_error(tmp_path: Path) -> None:
    run = write_run(tmp_path, "run", "SFTModule", SFT)
    with pytest.raises(InputError, match="split 'heldout'"):
        check_signatures([run], split="heldout")


# ---------------------------------------------------------------------------------------------------- curves


def test_signature_curves_are_the_handmade_curves(tmp_path: Path) -> None:
    run = write_run(tmp_path, "run", "SFTModule", SFT)
    c = signature_curves(run)
    assert list(c.index) == list(STEPS)
    for t, values in SFT.items():
        assert c[t].tolist() == pytest.approx(values), t
    assert c["chosen_energy"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert c["chosen_a_norm"].tolist() == c["rejected_a_norm"].tolist() == RISING_A_NORM
    assert c["chosen_logp"].tolist() == pytest.approx([-60 + x for x in SFT["chosen"]])
    assert {"rejected_logp", "chosen_p_e", "chosen_max_prob"} <= set(c.columns)


# ---------------------------------------------------------------------------------------------------- checks


def test_every_check_in_order_with_the_per_run_ones_per_run(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, "sft", "SFTModule", SFT), write_run(tmp_path, "dpo", "DPOModule", DPO)]
    signatures = check_signatures(runs)
    assert [(s.id, s.runs) for s in signatures] == [
        (4, ("sft",)), (5, ("sft",)), (6, ("sft",)), (7, ("sft",)), (8, ("sft",)), (9, ("dpo",)), (10, ("dpo",)),
        (11, ("dpo",)), (12, ("sft",)), (12, ("dpo",)), (13, ()), (14, ()), (15, ()), (16, ("sft",)),
        (16, ("dpo",))]
    assert [s.passed for s in signatures] == [True] * 10 + [None] * 3 + [True] * 2
    assert all(s.claim and s.detail for s in signatures)
    assert by_id(signatures, 4).reference.startswith("§6")


def test_4_sft_chosen_rises_monotonically(tmp_path: Path) -> None:
    assert check(tmp_path / "a", 4, sft()).numbers["Δ chosen"] == 12
    assert check(tmp_path / "b", 4, sft(changed(SFT, chosen=[0, 5, 4, 12]))).passed is False  # dips
    assert check(tmp_path / "c", 4, sft(changed(SFT, chosen=[0, 0, 0, -0.5]))).passed is False  # ends below
    assert check(tmp_path / "d", 4, sft(changed(SFT, chosen=[0, 5, 5 - 1e-4, 6]))).passed is True  # float noise
    no_chosen = {k: v for k, v in SFT.items() if k != "chosen"}
    assert check(tmp_path / "e", 4, sft(no_chosen)).passed is None
    one_eval = check(tmp_path / "f", 4, sft({t: v[:1] for t, v in SFT.items()}, steps=(0,)))
    assert one_eval.passed is None and "evaluations" in one_eval.detail
    assert check(tmp_path / "g", 4, dpo()).passed is None  # no sft run


def test_5_sft_argmax_rises_energy_and_p_e_fall_a_norm_rises(tmp_path: Path) -> None:
    assert check(tmp_path / "a", 5, sft()).passed is True
    assert check(tmp_path / "b", 5, sft(chosen={"energy": [0.6, 0.7, 0.8, 0.9]})).passed is False
    assert check(tmp_path / "c", 5, sft(chosen={"p_e": [1.0, 1.0, 1.0, 1.0]})).passed is False
    falling = check(tmp_path / "d", 5, sft(a_norm={"irr_test": [13.0, 12.0, 11.0, 10.0]}))
    assert falling.passed is False and "irr_test" in falling.detail and falling.numbers["Δ a_norm irr_test"] == -3
    assert check(tmp_path / "e", 5, sft(changed(SFT, argmax=[0, 1, 0, -1]))).passed is False
    assert check(tmp_path / "f", 5, sft(drop=("energy",))).passed is None
    no_a_norm = check(tmp_path / "g", 5, sft(drop=("a_norm",)))
    assert no_a_norm.passed is None and "a_norm" in no_a_norm.detail
    # a failed part decides even with another part undecided
    assert check(tmp_path / "h", 5, sft(chosen={"energy": [0.6, 0.7, 0.8, 0.9]}, drop=("a_norm",))).passed is False


def test_6_sft_irr_train_above_irr_test(tmp_path: Path) -> None:
    assert check(tmp_path / "a", 6, sft()).passed is True
    # irr_train from the data: trained on only if they are training rows' chosen responses, which no run records
    from_data = check(tmp_path / "f", 6, sft(data={"source": "hh.jsonl"}))
    assert from_data.passed is None and "rebuild_irr_train" in from_data.detail
    assert check(tmp_path / "g", 6, sft(data={"source": "hh.jsonl", "rebuild_irr_train": True})).passed is True
    assert check(tmp_path / "b", 6, sft(changed(SFT, irr_test=[0, 3, 4, 5]))).passed is False
    missing = check(tmp_path / "c", 6, sft({k: v for k, v in SFT.items() if k != "irr_test"}))
    assert missing.passed is None and "irr_test" in missing.detail


def test_7_sft_random_types_below_chosen(tmp_path: Path) -> None:
    assert check(tmp_path / "a", 7, sft()).passed is True
    assert check(tmp_path / "b", 7, sft(changed(SFT, random_permute=[0, 5, 10, 13]))).passed is False
    no_nonhum = {k: v for k, v in SFT.items() if k != "random_nonhum"}
    assert check(tmp_path / "c", 7, sft(no_nonhum)).passed is None  # never a silent pass
    assert check(tmp_path / "d", 7, sft(changed(no_nonhum, random_permute=[0, 5, 10, 13]))).passed is False


def test_8_sft_rejected_rises_early_below_chosen_then_plateaus(tmp_path: Path) -> None:
    assert check(tmp_path / "a", 8, sft()).passed is True  # 0, 3, 4, 4.2: a plateau
    assert check(tmp_path / "b", 8, sft(changed(SFT, rejected=[0, 3, 5, 4]))).passed is True  # a peak
    accelerating = check(tmp_path / "c", 8, sft(changed(SFT, rejected=[0, 0.5, 2, 6])))
    assert accelerating.passed is False and "plateaus or peaks" in accelerating.detail
    assert check(tmp_path / "d", 8, sft(changed(SFT, rejected=[0, 6, 7, 7.1]))).passed is False  # above chosen
    assert check(tmp_path / "e", 8, sft(changed(SFT, rejected=[0, -1, -1.5, -1.6]))).passed is False  # never up
    two_evals = check(tmp_path / "f", 8, sft({t: v[::3] for t, v in SFT.items()}, steps=(0, 24)))
    assert two_evals.passed is None and "3 evaluations" in two_evals.detail


def test_9_dpo_margin_rises_rejected_falls_much_more(tmp_path: Path) -> None:
    good = check(tmp_path / "a", 9, dpo())
    assert good.passed is True and good.numbers == {"Δ chosen": -3, "Δ rejected": -30, "Δ margin": 27}
    assert check(tmp_path / "b", 9, dpo(changed(DPO, chosen=[0, -5, -8, -10], rejected=[0, -5, -10, -15]))
                 ).passed is False  # falls more, but not twice as much
    assert check(tmp_path / "c", 9, dpo(changed(DPO, rejected=[0, 1, 1, 1]))).passed is False
    rising = check(tmp_path / "e", 9, dpo(changed(DPO, chosen=[0, 2, 4, 6], rejected=[0, 1, 0.5, 0])))
    assert rising.passed is False and "failed: rejected falls much more" in rising.detail  # no fall at all
    assert check(tmp_path / "d", 9, sft()).passed is None


def test_10_dpo_chosen_ends_below_start(tmp_path: Path) -> None:
    good = check(tmp_path / "a", 10, dpo())
    assert good.passed is True and good.numbers["Δ chosen max"] == 0.5 and good.numbers["max at step"] == 8
    assert check(tmp_path / "b", 10, dpo(changed(DPO, chosen=[0, 1, 2, 0.5]))).passed is False
    assert check(tmp_path / "c", 10, dpo({k: v for k, v in DPO.items() if k != "chosen"})).passed is None


def test_11_dpo_squeezing(tmp_path: Path) -> None:
    good = check(tmp_path / "a", 11, dpo())
    assert good.passed is True and "irr_hum" in good.detail and good.numbers["Δ argmax"] == 6
    rising = check(tmp_path / "b", 11, dpo(changed(DPO, irr_hum=[0, 1, 2, 1])))
    assert rising.passed is False and "(not: irr_hum)" in rising.detail
    assert check(tmp_path / "c", 11, dpo(changed(DPO, argmax=[0, 1, 0, -1]))).passed is False
    assert check(tmp_path / "d", 11, dpo(a_norm={"rejected": [12.0, 12.0, 12.0, 12.0]})).passed is False
    assert check(tmp_path / "e", 11, dpo(drop=("a_norm",))).passed is None
    assert check(tmp_path / "f", 11, dpo({"chosen": DPO["chosen"], "argmax": DPO["argmax"]})).passed is None


NAN, INF = float("nan"), float("inf")


def test_12_and_16_fail_on_any_nan_or_inf(tmp_path: Path) -> None:
    every = {(s, t, r): {"argmax_logp": NAN} for s in STEPS for t in SFT if t != "argmax" for r in range(4)}
    all_nan = check(tmp_path / "a", 12, sft(rows=every))
    assert all_nan.passed is False and all_nan.numbers["non-finite"] == all_nan.numbers["rows"] == 4 * 6 * 4
    assert check(tmp_path / "b", 12, sft(rows={(8, "irr_test", 2): {"logp": INF}})).passed is False
    one = check(tmp_path / "c", 16, sft(rows={(8, "rejected", 0): {"energy": NAN}}))
    assert one.passed is False and one.numbers["energy non-finite"] == 1
    assert check(tmp_path / "d", 16, sft(rows={(8, "rejected", 0): {"a_norm": INF}})).passed is False


def test_a_nan_in_a_mean_is_never_averaged_away(tmp_path: Path) -> None:
    nan_chosen = {(16, "chosen", 1): {"logp": NAN}}
    for i, check_id in enumerate((4, 6, 7, 8)):
        s = check(tmp_path / f"a{i}", check_id, sft(rows=nan_chosen if check_id != 6 else {(16, "irr_test", 1):
                                                                                              {"logp": INF}}))
        assert s.passed is None and "NaN or ±inf" in s.detail, s
    a_norm = check(tmp_path / "b", 5, sft(rows={(8, "irr_test", 0): {"a_norm": NAN}}))
    assert a_norm.passed is None and "undecided: every a_norm rises (NaN or ±inf: irr_test)" in a_norm.detail
    random = check(tmp_path / "c", 7, sft(rows={(24, "random_permute", 3): {"logp": NAN}}))
    assert random.passed is None and "random_permute below chosen (NaN or ±inf in random_permute)" in random.detail
    other = check(tmp_path / "d", 11, dpo(rows={(8, "irr_hum", 0): {"logp": NAN}}))
    assert other.passed is None and "every other type falls (NaN or ±inf: irr_hum)" in other.detail
    assert check(tmp_path / "e", 9, dpo(rows={(8, "rejected", 0): {"logp": NAN}})).passed is None
    extend = ("extend", "ExtendSFTModule", changed(SFT, rejected=[0, 8, 10, 11]), {"rows": {(24, "rejected", 0):
                                                                                           {"logp": NAN}}})
    assert check(tmp_path / "f", 13, sft(), extend).passed is None


def test_12_argmax_logp_at_least_logp_on_every_run(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, "sft", "SFTModule", SFT),
            write_run(tmp_path, "dpo", "DPOModule", DPO, rows={(16, "irr_hum", 2): {"argmax_logp": -80.0}}),
            write_run(tmp_path, "other", "SFTModule", SFT, rows={(8, "chosen", 1): {"argmax_logp": -55.5 - 3e-4}})]
    signatures = check_signatures(runs)
    assert by_id(signatures, 12, "sft").passed is True
    bad = by_id(signatures, 12, "dpo")
    assert bad.passed is False and bad.numbers["violations"] == 1
    assert by_id(signatures, 12, "SFTModule_2").passed is True  # within the float32 tolerance
    no_column = write_run(tmp_path / "b", "sft", "SFTModule", SFT, drop=("argmax_logp",))
    assert by_id(check_signatures([no_column]), 12).passed is None


def test_13_extend_ends_with_rejected_above_sft(tmp_path: Path) -> None:
    extend = ("extend", "ExtendSFTModule", changed(SFT, rejected=[0, 8, 10, 11]), {})
    good = check(tmp_path / "a", 13, sft(), extend)
    assert good.passed is True and good.numbers["extend − sft end"] == pytest.approx(11 - 4.2)
    assert good.runs == ("sft", "extend")
    lower = ("extend", "ExtendSFTModule", changed(SFT, rejected=[0, 1, 1, 1]), {})
    assert check(tmp_path / "b", 13, sft(), lower).passed is False
    assert check(tmp_path / "c", 13, sft()).passed is None
    other_probes = ("extend", "ExtendSFTModule", SFT, {"probe_text": "different"})
    assert "different probe texts" in check(tmp_path / "d", 13, sft(), other_probes).detail


def test_14_dpo_from_extend_drops_less_and_squeezes_less(tmp_path: Path) -> None:
    def pair(root: Path, ext_curves: dict, steps=STEPS) -> Signature:
        runs = [sft(), ("extend", "ExtendSFTModule", SFT, {})]
        dirs = [write_run(root, *r[:3], **r[3]) for r in runs]
        dirs.append(write_run(root, "dpo", "DPOModule", DPO, init_from=str(dirs[0] / "export")))
        dirs.append(write_run(root, "dpo_ext", "DPOModule", ext_curves, init_from=str(dirs[1] / "export"),
                              steps=steps))
        return by_id(check_signatures(dirs), 14)

    good = pair(tmp_path / "a", changed(DPO, chosen=[0, 0.5, 0, -1], argmax=[0, 1, 2, 3]))
    assert good.passed is True and good.runs == ("dpo", "dpo_extend") and good.numbers["step"] == 24
    assert pair(tmp_path / "b", changed(DPO, argmax=[0, 2, 5, 9])).passed is False
    assert pair(tmp_path / "c", changed(DPO, chosen=[0, -2, -4, -6])).passed is False
    # a shorter extend DPO run is compared at the last step both evaluated
    short = pair(tmp_path / "d", {k: [v[0], v[1] + 1, v[1] - 0.5] for k, v in DPO.items()}, steps=(0, 8, 16))
    assert short.numbers["step"] == 16 and short.numbers["Δ chosen dpo"] == -1
    assert check(tmp_path / "e", 14, dpo()).passed is None


def test_15_on_policy_squeezes_less_than_off_policy(tmp_path: Path) -> None:
    s = check(tmp_path / "a", 15, sft(), dpo())
    assert s.passed is None and "on-policy DPO run" in s.detail

    def pair(root: Path, on_curves: dict, on_start: str | None = None, steps=STEPS) -> Signature:
        sft_dir = write_run(root, *sft()[:3])
        start = str(sft_dir / "export")
        dirs = [sft_dir, write_run(root, "dpo", "DPOModule", DPO, init_from=start),
                write_run(root, "spin", "DPOModule", on_curves, init_from=on_start or start, negatives="policy",
                          steps=steps)]
        signatures = check_signatures(dirs)
        assert by_id(signatures, 9).runs == ("dpo",)  # the on-policy run is never the off-policy "dpo"
        return by_id(signatures, 15)

    good = pair(tmp_path / "b", changed(DPO, chosen=[0, 0.5, 0, -1], argmax=[0, 1, 1.5, 2]))
    assert good.passed is True and good.runs == ("dpo", "dpo_onpolicy") and good.numbers["step"] == 24
    assert good.numbers["Δ chosen dpo_onpolicy"] == -1 and good.numbers["Δ chosen dpo"] == -3
    assert pair(tmp_path / "c", changed(DPO, chosen=[0, 0.5, 0, -1], argmax=[0, 5, 9, 12])).passed is False
    assert pair(tmp_path / "d", changed(DPO, chosen=[0, -5, -8, -9], argmax=[0, 1, 1, 1])).passed is False
    other = pair(tmp_path / "e", changed(DPO, chosen=[0, 0, 0, 0]), on_start="some/other/model")
    assert other.passed is None and "different models" in other.detail
    short = pair(tmp_path / "f", {k: [v[0], v[1] + 1, v[1] - 0.5] for k, v in DPO.items()}, steps=(0, 8, 16))
    assert short.numbers["step"] == 16


def test_16_metric_units(tmp_path: Path) -> None:
    assert check(tmp_path / "a", 16, sft()).passed is True
    for i, cell in enumerate(({"energy": 1.01}, {"p_e": math.sqrt(2) + 1e-3}, {"a_norm": 9.9}, {"a_norm": 14.2})):
        bad = check(tmp_path / f"b{i}", 16, sft(rows={(8, "rejected", 0): cell}))
        assert bad.passed is False, cell
    assert check(tmp_path / "c", 16, sft(rows={(8, "rejected", 0): {"a_norm": math.sqrt(99)}})).passed is True
    no_vocab = check(tmp_path / "d", 16, sft(vocab=None))
    assert no_vocab.passed is None and "vocabulary size unknown" in no_vocab.detail
    assert check(tmp_path / "e", 16, sft(vocab=None, rows={(8, "chosen", 0): {"energy": -0.1}})).passed is False
    # V from the parent's export when the run has none (a run stopped before its export)
    base = write_run(tmp_path / "f", "sft", "SFTModule", SFT, vocab=VOCAB)
    child = write_run(tmp_path / "f", "dpo", "DPOModule", DPO, vocab=None, init_from=str(base / "export"))
    s = by_id(check_signatures([base, child]), 16, "dpo")
    assert s.passed is True and s.numbers["V"] == VOCAB and str(base / "export") in s.detail


def test_signature_table(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, "sft", "SFTModule", changed(SFT, chosen=[0, 5, 4, 12])),
            write_run(tmp_path, "dpo", "DPOModule", DPO)]
    table = signature_table(check_signatures(runs))
    lines = table.splitlines()
    assert lines[0] == "| § | claim | runs | result | numbers | reference |"
    row4 = next(line for line in lines if line.startswith("| 4 |"))
    assert "| not shown (at this scale) |" in row4 and "Δ chosen = 12," in row4
    assert any(line.startswith("| 15 |") and "undecided" in line for line in lines)
    assert any(line.startswith("- §4 (sft), not shown (at this scale): rule:") for line in lines)
    assert not any(line.startswith("- §9 ") for line in lines)  # passed checks get no note
    assert any(line.startswith("| 12 |") and "| pass |" in line for line in lines)


def test_one_result_wording_the_invariants_fail_the_signatures_are_not_shown(tmp_path: Path) -> None:
    def word(check: int, passed) -> str:
        return result_word(Signature(check, "claim", passed, {}, "", ()))

    assert [word(12, p) for p in (True, False, None)] == ["pass", "FAIL", "undecided"]
    assert [word(16, p) for p in (True, False, None)] == ["pass", "FAIL", "undecided"]
    assert [word(4, p) for p in (True, False, None)] == ["shown", "not shown (at this scale)", "undecided"]
    run = write_run(tmp_path, "sft", "SFTModule", SFT,
                    rows={(8, "chosen", 1): {"energy": 2.0}})
    assert "| 16 | energy ∈ [0, 1]" in (table := signature_table(check_signatures([run]))) and "| FAIL |" in table


# ---------------------------------------------------------------------------------------------------- end to end


def test_a_real_tiny_sft_run_decides_the_per_run_checks(tmp_path: Path) -> None:
    proc = run_dynlab("fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
                      cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir_of(proc, tmp_path)
    assert run_roles([run]) == {"sft": run}
    for split in ("train", "test"):
        signatures = check_signatures([run], split=split)
        assert by_id(signatures, 12, "sft").passed is True, split
        units = by_id(signatures, 16, "sft")
        assert units.passed is True and units.numbers["V"] == 512, units
        assert all(s.passed is not None for s in signatures if s.id in (4, 5, 6, 7, 8))  # decided, either way
