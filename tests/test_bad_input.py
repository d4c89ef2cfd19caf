"""Bad input fails before training with one line naming the file, row and field, exit code 2, and no run files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynlab.cli import main
from tests.conftest import CONFIGS, run_dynlab

GOOD = {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:", "chosen": " Paris.",
        "rejected": " Lyon, I think."}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def fit_args(source: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
            f"--data.init_args.source={source}", "--data.init_args.num_train=3", "--data.init_args.num_heldout=2",
            "--data.init_args.probe_size=2", *extra]


def fails_with(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not Path("runs").exists()  # nothing half-written
    return err[0]


BAD_ROWS = {
    "missing_field": ({k: v for k, v in GOOD.items() if k != "rejected"}, "row 3", "'rejected'"),
    "non_string": ({**GOOD, "chosen": 5}, "row 3", "'chosen'"),
    "empty_response": ({**GOOD, "rejected": "   "}, "row 3", "'rejected'"),
    "unparseable": ('{"prompt": "x", "chosen": ', "row 3", ""),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row(case, in_tmp, capsys):
    bad, row, field = BAD_ROWS[case]
    data = write_rows(in_tmp / "prefs.jsonl", [GOOD, GOOD, bad, GOOD, GOOD])
    line = fails_with(capsys, fit_args(data))
    assert line.startswith("dynlab: error: ") and str(data) in line and row in line and field in line


def test_pair_that_cannot_fit_max_length(in_tmp, capsys):
    long = {**GOOD, "chosen": " Paris" * 200}
    data = write_rows(in_tmp / "prefs.jsonl", [GOOD, long, GOOD, GOOD, GOOD])
    line = fails_with(capsys, fit_args(data))
    assert "row 2" in line and "'chosen'" in line and "max_length" in line


def test_missing_data_file(in_tmp, capsys):
    line = fails_with(capsys, fit_args(in_tmp / "nope.jsonl"))
    assert "nope.jsonl" in line


def test_unknown_model_path(in_tmp, capsys):
    data = write_rows(in_tmp / "prefs.jsonl", [GOOD] * 5)
    line = fails_with(capsys, fit_args(data, "--model.init_args.policy.name_or_path=./no/such/model"))
    assert "model.policy.name_or_path" in line and "./no/such/model" in line


def test_unknown_init_from(in_tmp, capsys):
    line = fails_with(capsys, fit_args(write_rows(in_tmp / "p.jsonl", [GOOD] * 5),
                                       "--model.init_args.init_from=missing.ckpt"))
    assert "missing.ckpt" in line and "model.init_from" in line


def test_cli_exit_code_and_one_line_from_a_real_process(tmp_path):
    data = write_rows(tmp_path / "prefs.jsonl", [GOOD, {**GOOD, "chosen": None}, GOOD, GOOD, GOOD])
    proc = run_dynlab(*fit_args(data), cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"dynlab: error: {data}: row 2: field 'chosen'")
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
