"""The per-step parquet trajectory store: flat records, atomic writes, a re-evaluated step replacing its file,
and the probe jsonl files round-tripping through the probe reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dynlab.data.formats import load_rows
from dynlab.tracking.trajectory import (
    KEY_COLUMNS,
    TRAJECTORY_DIR,
    read_trajectory,
    records_from_results,
    write_jsonl,
    write_probe_set,
    write_step,
)


def results(step: int, rows=(0, 1, 2)) -> dict[str, list[dict]]:
    """Per-split probe results as CausalLMModule hands them over; the values encode (step, type, row)."""
    out = {}
    for split, offset in (("train", 0.0), ("test", 0.5)):
        out[split] = {t: {"logp": [-(10 * k + r + offset) - step for r in rows],
                          "dlogp": [-float(step) for _ in rows], "row": list(rows)}
                      for k, t in enumerate(("chosen", "rejected"))}
    return out


def step_records(step: int, **kwargs) -> list[dict]:
    return [rec for split, res in results(step, **kwargs).items() for rec in records_from_results(split, res)]


def files_in(run: Path) -> list[str]:
    return sorted(p.name for p in (run / TRAJECTORY_DIR).iterdir())


def test_records_from_results_one_flat_record_per_type_and_row():
    res = {"chosen": {"logp": np.array([-1.5, -2.0], dtype=np.float32), "max_prob": [0.25, 0.5],
                      "row": np.array([3, 7])},
           "rejected": {"logp": [-4.0], "max_prob": [0.125], "row": [3]}}
    records = records_from_results("test", res)
    assert records == [
        {"split": "test", "type": "chosen", "row": 3, "logp": -1.5, "max_prob": 0.25},
        {"split": "test", "type": "chosen", "row": 7, "logp": -2.0, "max_prob": 0.5},
        {"split": "test", "type": "rejected", "row": 3, "logp": -4.0, "max_prob": 0.125},
    ]
    # plain Python numbers, so parquet and JSON get ints and doubles whatever the caller passed
    assert all(type(r["row"]) is int and type(r["logp"]) is float for r in records)


def test_write_step_then_read_back(tmp_path):
    run = tmp_path / "runs" / "dpo" / "version_0"
    path = write_step(run, 5, step_records(5))
    assert path == run / TRAJECTORY_DIR / "step_00000005.parquet"
    frame = read_trajectory(run)
    assert list(frame.columns[:4]) == list(KEY_COLUMNS)
    assert len(frame) == 2 * 2 * 3 and set(frame["step"]) == {5}
    assert frame["step"].dtype == np.int64 and frame["row"].dtype == np.int64
    chosen_test_1 = frame[(frame["split"] == "test") & (frame["type"] == "chosen") & (frame["row"] == 1)]
    assert chosen_test_1["logp"].tolist() == [-(1 + 0.5) - 5]
    assert files_in(run) == ["step_00000005.parquet"]  # no temporary file left behind


def test_rewriting_a_step_replaces_it_so_a_resumed_run_has_no_duplicates(tmp_path):
    run = tmp_path / "run"
    for step in (0, 5, 10):  # the first run, killed after its evaluation at step 10
        write_step(run, step, step_records(step))
    # the resumed run restarts from the step-5 checkpoint: it evaluates 5 and 10 again, with other values
    for step in (5, 10, 15):
        write_step(run, step, [{**r, "logp": r["logp"] - 100} for r in step_records(step)])
    frame = read_trajectory(run)
    assert not frame.duplicated(list(KEY_COLUMNS)).any()
    assert frame.groupby(list(KEY_COLUMNS)).size().eq(1).all()
    assert len(frame) == 4 * 12 and sorted(set(frame["step"])) == [0, 5, 10, 15]
    # the replaced steps hold the resumed run's values, step 0 the first run's
    first = frame[(frame["split"] == "train") & (frame["type"] == "chosen") & (frame["row"] == 0)]
    assert first["logp"].tolist() == [0.0, -105.0, -110.0, -115.0]
    assert files_in(run) == [f"step_{s:08d}.parquet" for s in (0, 5, 10, 15)]


def test_a_rewrite_with_fewer_rows_drops_the_old_rows(tmp_path):
    write_step(tmp_path, 3, step_records(3, rows=(0, 1, 2)))
    write_step(tmp_path, 3, step_records(3, rows=(1,)))
    frame = read_trajectory(tmp_path)
    assert sorted(set(frame["row"])) == [1] and len(frame) == 4


def test_read_trajectory_is_sorted_by_step_split_type_row(tmp_path):
    for step in (10, 0, 5):
        write_step(tmp_path, step, list(reversed(step_records(step))))
    frame = read_trajectory(tmp_path)
    keys = list(frame[list(KEY_COLUMNS)].itertuples(index=False, name=None))
    assert keys == sorted(keys)


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    write_step(tmp_path, 5, step_records(5))
    before = (tmp_path / TRAJECTORY_DIR / "step_00000005.parquet").read_bytes()
    bad = [{**r, "logp": object()} for r in step_records(5)]  # pyarrow cannot store it
    with pytest.raises(pa.ArrowException):
        write_step(tmp_path, 5, bad)
    assert files_in(tmp_path) == ["step_00000005.parquet"]
    assert (tmp_path / TRAJECTORY_DIR / "step_00000005.parquet").read_bytes() == before


@pytest.mark.parametrize("layout", ["missing", "empty_dir", "empty_step"])
def test_read_trajectory_without_rows_is_empty(tmp_path, layout):
    if layout == "empty_dir":
        (tmp_path / TRAJECTORY_DIR).mkdir(parents=True)
    elif layout == "empty_step":  # an evaluation that scored no probe rows
        write_step(tmp_path, 0, [])
    frame = read_trajectory(tmp_path)
    assert frame.empty and list(frame.columns) == list(KEY_COLUMNS)


def test_an_empty_step_does_not_disturb_the_others(tmp_path):
    write_step(tmp_path, 0, step_records(0))
    write_step(tmp_path, 5, [])
    frame = read_trajectory(tmp_path)
    assert len(frame) == 12 and set(frame["step"]) == {0} and frame["step"].dtype == np.int64


PROBE_ROWS = [
    {"prompt": "\n\nHuman: Où est la gare?\n\nAssistant:", "chosen": " Tout droit — 200 m.", "rejected": " Non.",
     "chosen_initial": "", "irr_hum": " A line\nwith a newline and \"quotes\"."},
    {"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5", "chosen_initial": " four",
     "irr_hum": " 🙂"},
]


def test_write_probe_set_round_trips_through_the_probe_reader(tmp_path):
    path = write_probe_set(tmp_path / "run", "test", PROBE_ROWS)
    assert path == tmp_path / "run" / "probes" / "probe_test.jsonl"
    assert load_rows(str(path), format="probe") == PROBE_ROWS
    assert "Où" in path.read_text(encoding="utf-8")  # real UTF-8, not \\u escapes
    assert sorted(p.name for p in path.parent.iterdir()) == ["probe_test.jsonl"]


def test_write_jsonl_replaces_the_file(tmp_path):
    out = tmp_path / "deep" / "dir" / "probe.jsonl"
    write_jsonl(out, PROBE_ROWS)
    write_jsonl(out, PROBE_ROWS[1:])
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == PROBE_ROWS[1:]
    assert load_rows(str(out), format="probe") == PROBE_ROWS[1:]


def test_write_jsonl_failure_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "probe.jsonl"
    write_jsonl(out, PROBE_ROWS)
    with pytest.raises(TypeError):
        write_jsonl(out, [PROBE_ROWS[0], {"prompt": object()}])
    assert [p.name for p in tmp_path.iterdir()] == ["probe.jsonl"]
    assert load_rows(str(out), format="probe") == PROBE_ROWS  # the old file, untouched
