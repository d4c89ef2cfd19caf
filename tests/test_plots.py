"""Paper-style figures from hand-made trajectories: the files ``plot_runs`` and ``dynlab plot`` write, the
argmax pseudo-type and the curves behind the figures, with hand-worked numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from dynlab.cli import main
from dynlab.tracking.plots import _with_argmax, mean_curves, plot_runs, run_labels
from dynlab.tracking.trajectory import write_step

STEPS = (0, 5, 10)
BASE = {"chosen": -20.0, "rejected": -30.0, "irr_hum": -40.0}
SLOPE = {"chosen": 0.4, "rejected": -1.0, "irr_hum": -0.2}  # Δlog π per step of row 0


def trajectory(scale: float = 1.0, splits=("train", "test"), types=tuple(BASE), rows=(0, 1)) -> pd.DataFrame:
    """A run's trajectory: row r of a type moves by SLOPE * (1 + 0.1 r) * scale per step; argmax grows faster."""
    records = []
    for step in STEPS:
        for split in splits:
            for t in types:
                for r in rows:
                    dlogp = SLOPE[t] * (1 + 0.1 * r) * scale * step
                    logp = BASE[t] - r + dlogp
                    max_prob = 0.2 + 0.05 * step
                    records.append({"step": step, "split": split, "type": t, "row": r, "logp": logp, "dlogp": dlogp,
                                    "argmax_logp": logp + 2 + 0.3 * step, "max_prob": max_prob,
                                    "peakiness": max_prob**2})
    return pd.DataFrame(records)


def write_run(run: Path, frame: pd.DataFrame) -> Path:
    for step, part in frame.groupby("step"):
        write_step(run, int(step), part.drop(columns="step").to_dict("records"))
    return run


def assert_png(path: Path, wide: bool = True) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 20_000, path
    image = matplotlib.image.imread(path)
    height, width, channels = image.shape
    assert channels in (3, 4) and height > 300 and (width > height if wide else width > 300)
    assert (image[..., :3] < 0.9).mean() > 0.01  # lines and text, not a blank canvas
    return image


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [write_run(tmp_path / "runs" / "dpo" / f"version_{i}", trajectory(scale=1.0 + i)) for i in range(2)]


def test_one_run_gives_the_probe_and_squeezing_figures(runs, tmp_path):
    written = plot_runs([runs[0]], tmp_path / "figs")
    assert written == [tmp_path / "figs" / "probe_dlogp.png", tmp_path / "figs" / "squeezing.png"]
    for path in written:
        assert_png(path)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["probe_dlogp.png", "squeezing.png"]


def test_two_runs_give_per_run_figures_and_an_overlay(runs, tmp_path):
    out = tmp_path / "figs"
    written = plot_runs(runs, out)
    names = [p.name for p in written]
    assert names == ["dpo_version_0_probe_dlogp.png", "dpo_version_0_squeezing.png",
                     "dpo_version_1_probe_dlogp.png", "dpo_version_1_squeezing.png", "overlay.png"]
    images = {name: assert_png(out / name) for name in names}
    # the two runs' data differ, so their figures do
    assert not np.array_equal(images["dpo_version_0_probe_dlogp.png"], images["dpo_version_1_probe_dlogp.png"])


def test_runs_with_the_same_last_two_directories_are_all_plotted(tmp_path):
    # baseline SFT->DPO against ExtendSFT->DPO, each in its own root: both are runs/dpo/version_0 there
    roots = [write_run(tmp_path / root / "dpo" / "version_0", trajectory(scale)) for root, scale in
             (("base", 1.0), ("extend", 2.0))]
    assert run_labels(roots) == ["base/dpo/version_0", "extend/dpo/version_0"]
    names = [p.name for p in plot_runs(roots, tmp_path / "figs")]
    assert names == ["base_dpo_version_0_probe_dlogp.png", "base_dpo_version_0_squeezing.png",
                     "extend_dpo_version_0_probe_dlogp.png", "extend_dpo_version_0_squeezing.png", "overlay.png"]


def test_a_run_with_one_split_and_one_type_still_plots(tmp_path):
    run = write_run(tmp_path / "run", trajectory(splits=("train",), types=("chosen",)))
    for path in plot_runs([run], tmp_path / "figs"):
        assert_png(path, wide=False)


def test_mean_curves_hand_worked():
    frame = trajectory()
    curves = mean_curves(frame, "train", "dlogp")
    assert list(curves.index) == list(STEPS)
    # chosen at step 10: rows 0 and 1 moved 0.4*10*1.0 = 4.0 and 0.4*10*1.1 = 4.4 -> mean 4.2, s.e. 0.2
    assert curves[("mean", "chosen")].loc[10] == pytest.approx(4.2)
    assert curves[("sem", "chosen")].loc[10] == pytest.approx(0.2)
    assert curves[("mean", "rejected")].loc[5] == pytest.approx(-1.0 * 5 * 1.05)
    assert curves[("sem", "irr_hum")].loc[0] == 0.0


def test_with_argmax_is_the_chosen_argmax_logp_minus_its_step0_value_per_split_and_row():
    rows = [  # (step, split, type, row, argmax_logp); train row 0 and test row 0 share a row index
        (0, "train", "chosen", 0, -10.0), (0, "train", "chosen", 1, -4.0), (0, "test", "chosen", 0, -1.0),
        (5, "train", "chosen", 0, -7.0), (5, "train", "chosen", 1, -6.0), (5, "test", "chosen", 0, -0.5),
        (0, "train", "rejected", 0, -50.0), (5, "train", "rejected", 0, -3.0),  # not the chosen prefix: ignored
    ]
    frame = pd.DataFrame(rows, columns=["step", "split", "type", "row", "argmax_logp"]).sample(frac=1, random_state=0)
    frame["dlogp"] = 0.0
    out = _with_argmax(frame)
    assert len(out) == len(frame) + 6
    pd.testing.assert_frame_equal(out.iloc[: len(frame)], frame.reset_index(drop=True))
    argmax = out[out["type"] == "argmax"].set_index(["step", "split", "row"])["dlogp"].sort_index()
    expected = {(0, "train", 0): 0.0, (0, "train", 1): 0.0, (0, "test", 0): 0.0,
                (5, "train", 0): 3.0, (5, "train", 1): -2.0, (5, "test", 0): 0.5}
    assert argmax.to_dict() == expected


def test_with_argmax_on_the_synthetic_run():
    frame = trajectory()
    argmax = _with_argmax(frame).query("type == 'argmax'")
    # argmax_logp = logp + 2 + 0.3 step, so its Δ is chosen's Δ plus 0.3 step
    chosen = frame.query("type == 'chosen'")
    np.testing.assert_allclose(argmax["dlogp"].to_numpy(), chosen["dlogp"].to_numpy() + 0.3 * chosen["step"])


def test_cli_plot_writes_the_files_and_prints_their_paths(runs, tmp_path, capsys):
    out = tmp_path / "cli_figs"
    main(["plot", str(runs[0]), str(runs[1]), "--out", str(out)])
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5 and Path(printed[-1]) == out / "overlay.png"
    for path in printed:
        assert_png(Path(path))


def test_cli_plot_of_a_directory_without_a_trajectory_exits_2_with_one_line(runs, tmp_path, capsys):
    empty = tmp_path / "runs" / "sft" / "version_0"
    empty.mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main(["plot", str(runs[0]), str(empty), "--out", str(tmp_path / "figs")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynlab: error: ")
    assert str(empty) in err[0] and "no probe trajectory" in err[0]


def test_every_probe_type_has_its_own_style():
    from dynlab.data.probes import PROBE_TYPES
    from dynlab.tracking.plots import FALLBACK_STYLE, STYLE

    types = [*PROBE_TYPES, "argmax"]
    assert set(types) <= set(STYLE)
    colours = [STYLE[t][0] for t in types]
    assert len(set(colours)) == len(colours)  # distinguishable by colour alone
    assert len({STYLE[t][1:] for t in types if t.startswith("random")}) == 2  # and in greyscale: line and marker
    assert FALLBACK_STYLE[0] not in colours
