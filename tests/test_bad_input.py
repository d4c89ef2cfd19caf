"""Bad input fails before training with one line naming the file, row and field, exit code 2, and no run files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from dynlab.cli import main
from tests.conftest import CONFIGS, run_dynlab

GOOD = {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:", "chosen": " Paris.",
        "rejected": " Lyon, I think."}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def fit_args(source: Path, *extra: str, stage: str = "sft") -> list[str]:
    return ["fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
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


BAD_ROWS = {  # the row, what the line must name, the stage
    "missing_rejected_for_dpo": ({k: v for k, v in GOOD.items() if k != "rejected"}, "row 3", "'rejected'", "dpo"),
    "probe_row_without_rejected_for_dpo": ({"prompt": GOOD["prompt"], "chosen": GOOD["chosen"], "irr_hum": " A tree."},
                                           "row 3", "field 'rejected': missing field", "dpo"),
    "non_string": ({**GOOD, "chosen": 5}, "row 3", "'chosen'", "sft"),
    "empty_response": ({**GOOD, "rejected": "   "}, "row 3", "'rejected'", "sft"),  # given, so checked, in SFT too
    "unparseable": ('{"prompt": "x", "chosen": ', "row 3", "", "sft"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row(case, in_tmp, capsys):
    bad, row, field, stage = BAD_ROWS[case]
    data = write_rows(in_tmp / "prefs.jsonl", [GOOD, GOOD, bad, GOOD, GOOD])
    line = fails_with(capsys, fit_args(data, stage=stage))
    assert line.startswith("dynlab: error: ") and str(data) in line and row in line and field in line


SFT_ONLY = {  # rows with the preferred response alone, in each format; of the 3 training rows, how many lack it
    "flat": ([{"prompt": GOOD["prompt"], "chosen": GOOD["chosen"]}], 3),
    "hh": ([{"chosen": GOOD["prompt"] + GOOD["chosen"]}], 3),
    "chat_messages": ([{"messages": [{"role": "user", "content": "What is the capital of France?"},
                                     {"role": "assistant", "content": "Paris."}]}], 3),
    "mixed_with_null": ([GOOD, {"prompt": GOOD["prompt"], "chosen": GOOD["chosen"], "rejected": None}], 1),
}


@pytest.mark.parametrize("case", SFT_ONLY)
def test_sft_trains_on_rows_without_rejected_and_dpo_refuses_them(case, in_tmp, capsys, caplog):
    rows, lacking = SFT_ONLY[case]
    data = write_rows(in_tmp / "sft.jsonl", rows * 6)
    for stage in ("sft", "extend_sft"):
        with caplog.at_level(logging.WARNING, logger="dynlab.data.datamodule"):
            main(fit_args(data, "--trainer.max_steps=2", "--model.init_args.probe_every_n_steps=2", stage=stage))
        run = next(Path("runs", stage).glob("version_*"))
        assert (run / "export" / "config.json").is_file()
        said = [r.getMessage() for r in caplog.records]
        skipped = [m for m in said if m.startswith("probe types skipped")]
        assert len(skipped) == 1 and "'rejected'" in skipped[0]  # every row lacks it (mixed: the first 3 rows too)
        extend = [m for m in said if m.startswith("ExtendSFT:")]
        assert extend == ([f"ExtendSFT: {lacking} of 3 training rows have no rejected response: those train "
                           "on their chosen response alone"] if stage == "extend_sft" else [])
        caplog.clear()
    capsys.readouterr()
    shutil.rmtree("runs")
    line = fails_with(capsys, fit_args(data, stage="dpo"))
    assert f"{data}: row " in line and "field 'rejected': " in line, line  # missing, or null


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


# ---- values refused before the run starts (each gave a traceback and a run directory, or was silently taken) ----
M, D = "--model.init_args.", "--data.init_args."
BAD_VALUES = {  # extra args, stage, what the line must name
    "negative_lr": ([f"{M}optimizer.init_args.lr=-1"], "sft", "field 'model.optimizer'"),
    "scheduler_start_factor_2": ([f"{M}scheduler=torch.optim.lr_scheduler.LinearLR",  # not model.optimizer
                                  f"{M}scheduler.init_args.start_factor=2"], "sft", "field 'model.scheduler'"),
    "batch_size_0": ([f"{D}batch_size=0"], "sft", "field 'data.batch_size'"),
    "negative_batch_size": ([f"{D}batch_size=-2"], "sft", "field 'data.batch_size'"),
    "probe_batch_size_0": ([f"{D}probe_batch_size=0"], "sft", "field 'data.probe_batch_size'"),
    "beta_0": ([f"{M}beta=0"], "dpo", "field 'model.beta'"),
    "negative_beta": ([f"{M}beta=-0.1"], "dpo", "field 'model.beta'"),
    "label_smoothing_half": ([f"{M}label_smoothing=0.5"], "dpo", "field 'model.label_smoothing'"),
    "negative_label_smoothing": ([f"{M}label_smoothing=-0.1"], "dpo", "field 'model.label_smoothing'"),
    "label_smoothing_with_ipo": ([f"{M}label_smoothing=0.1", f"{M}loss_type=ipo"], "dpo", "'sigmoid'"),
    "probe_chunk_tokens_0": ([f"{M}probe_chunk_tokens=0"], "sft", "field 'model.probe_chunk_tokens'"),
    "logp_chunk_tokens_0": ([f"{M}logp_chunk_tokens=0"], "sft", "field 'model.logp_chunk_tokens'"),
    "negative_probe_every_n_steps": ([f"{M}probe_every_n_steps=-1"], "sft", "field 'model.probe_every_n_steps'"),
    "num_train_0": ([f"{D}num_train=0"], "sft", "field 'data.num_train'"),
    "negative_num_train": ([f"{D}num_train=-1"], "sft", "field 'data.num_train'"),
    "num_heldout_0": ([f"{D}num_heldout=0"], "sft", "field 'data.num_heldout'"),
    "probe_size_0": ([f"{D}probe_size=0"], "sft", "probe_every_n_steps=0"),
    "probe_train_size_0": ([f"{D}probe_train_size=0"], "sft", "field 'data.probe_train_size'"),
    "probe_test_size_0": ([f"{D}probe_test_size=0"], "sft", "field 'data.probe_test_size'"),
    "max_length_1": ([f"{D}max_length=1"], "sft", "field 'data.max_length'"),
    "chosen_initial_max_tokens_0": ([f"{D}chosen_initial_max_tokens=0"], "sft",
                                    "field 'data.chosen_initial_max_tokens'"),
    "negative_num_workers": ([f"{D}num_workers=-1"], "sft", "field 'data.num_workers'"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_value(case, in_tmp, capsys):
    extra, stage, named = BAD_VALUES[case]
    line = fails_with(capsys, fit_args(write_rows(in_tmp / "p.jsonl", [GOOD] * 5), *extra, stage=stage))
    assert line.startswith("dynlab: error: ") and named in line, line


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, which Lightning lets a subclass (only) select on CPU: enough for a refusal that comes
    before the strategy starts a process group."""


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_gradient_entanglement_under_fsdp_is_refused_before_anything_is_written(stage, in_tmp, capsys):
    """Probe evaluation runs under FSDP (tests/test_fsdp.py); its opt-in gradient entanglement, whose backward passes
    run on the ranks holding the first K pairs only, does not."""
    strategy = f'--trainer.strategy={{"class_path": "{__name__}.CPUFSDPStrategy"}}'
    line = fails_with(capsys, fit_args(write_rows(in_tmp / "p.jsonl", [GOOD] * 5), strategy,
                                       "--trainer.accelerator=cpu", "--trainer.devices=1",
                                       "--model.init_args.probe_entanglement_pairs=1", stage=stage))
    assert line.startswith("dynlab: error: field 'model.probe_entanglement_pairs': gradient entanglement under FSDP")
    assert list(in_tmp.iterdir()) == [in_tmp / "p.jsonl"]  # no W&B run either


def bad_checkpoints(root: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not a usable checkpoint, and what the refusal must say."""
    root.mkdir()
    text = root / "text.ckpt"
    text.write_text("not a checkpoint\n")
    torch.save({"state_dict": {"policy.x": torch.zeros(64, 64)}}, whole := root / "whole.ckpt")
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    torch.save({"weights": torch.zeros(2)}, other := root / "other.ckpt")
    (data := root / "prefs.jsonl").write_text(json.dumps(GOOD) + "\n")
    return {"missing": (root / "missing.ckpt", "no such"), "text": (text, "not a PyTorch checkpoint"),
            "truncated": (truncated, "not a PyTorch checkpoint"), "data_file": (data, "not a PyTorch checkpoint"),
            "not_lightning": (other, "not a Lightning checkpoint")}


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "not_lightning"])
def test_bad_ckpt_path(case, in_tmp, capsys):
    path, says = bad_checkpoints(in_tmp / "ckpts")[case]
    line = fails_with(capsys, fit_args(write_rows(in_tmp / "p.jsonl", [GOOD] * 5), f"--ckpt_path={path}"))
    assert str(path) in line and "field 'ckpt_path'" in line and says in line, line


@pytest.mark.parametrize("case", ["text", "truncated", "data_file", "not_lightning", "directory"])
def test_bad_init_from(case, in_tmp, capsys):
    if case == "directory":  # a directory that holds no model
        (path := in_tmp / "not_a_model").mkdir()
        says = "no config.json"
    else:
        path, says = bad_checkpoints(in_tmp / "ckpts")[case]
    line = fails_with(capsys, fit_args(write_rows(in_tmp / "p.jsonl", [GOOD] * 5), f"{M}init_from={path}"))
    assert str(path) in line and "field 'model.init_from'" in line and says in line, line


def test_probe_size_larger_than_the_data_is_said(caplog):
    from dynlab.data.datamodule import ProbeDataModule
    from dynlab.models.load import tiny_tokenizer

    dm = ProbeDataModule(num_train=3, num_heldout=2, probe_size=5)
    with caplog.at_level(logging.WARNING, logger="dynlab.data.datamodule"):
        sets = dm.build_probe_sets(tiny_tokenizer())
    said = [r.getMessage() for r in caplog.records if "probe_" in r.getMessage()]
    assert said == ["data.probe_size is 5, but only 3 probe_train rows are available: probing those",
                    "data.probe_size is 5, but only 2 probe_test rows are available: probing those"], said
    assert [len(sets["train"]), len(sets["test"])] == [3, 2]


def test_each_probe_split_has_its_own_size(caplog):
    from dynlab.data.datamodule import ProbeDataModule
    from dynlab.models.load import tiny_tokenizer

    dm = ProbeDataModule(num_train=8, num_heldout=4, probe_size=3, probe_train_size=6, probe_test_size=5)
    with caplog.at_level(logging.WARNING, logger="dynlab.data.datamodule"):
        sets = dm.build_probe_sets(tiny_tokenizer())
    assert [len(sets["train"]), len(sets["test"])] == [6, 4]
    said = [r.getMessage() for r in caplog.records if "probe_" in r.getMessage()]
    assert said == ["data.probe_test_size is 5, but only 4 probe_test rows are available: probing those"], said
    sets = ProbeDataModule(num_train=8, num_heldout=4, probe_size=3, probe_test_size=2).build_probe_sets(
        tiny_tokenizer())
    assert [len(sets["train"]), len(sets["test"])] == [3, 2]  # None: probe_size


# ---- configuration errors: the reason first, on one line, not 60-75 lines of usage --------------------------------
CONFIG_ERRORS = {  # extra args (FILE: a config file with that text), what the line must say
    "unknown_key": ([f"{M}bogus=1"], ["model.bogus", "no such option", "--help"]),
    "unknown_key_in_a_file": (["FILE:trainer:\n  bogus: 1\n"], ["trainer.bogus", "no such option"]),
    "wrong_type": ([f"{D}batch_size=abc"], ["data.batch_size", "expected int", "'abc'"]),
    "bad_literal": ([f"{D}format=xml"], ["data.format", "'auto', 'hh', 'chat', 'flat', 'probe'", "'xml'"]),
    "bad_nested_literal": ([f"{M}policy.dtype=float8"], ["model.policy.dtype", "'float32', 'bfloat16'", "'float8'"]),
    "bad_yaml": (["FILE:model: [\n"], ["bad.yaml", "not valid YAML", "line 2"]),
    "empty_config": (["FILE:"], ["bad.yaml", "empty"]),
    "config_not_a_mapping": (["FILE:[1, 2]\n"], ["bad.yaml", "mapping"]),
    "missing_config": (["--config=nope.yaml"], ["nope.yaml", "no such config file"]),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_config_error_is_one_line(case, in_tmp, capsys):
    extra, says = CONFIG_ERRORS[case]
    args = []
    for arg in extra:
        if arg.startswith("FILE:"):
            (in_tmp / "bad.yaml").write_text(arg.removeprefix("FILE:"))
            arg = f"--config={in_tmp / 'bad.yaml'}"
        args.append(arg)
    line = fails_with(capsys, fit_args(write_rows(in_tmp / "p.jsonl", [GOOD] * 5), *args))
    assert line.startswith("dynlab: error: ") and all(s in line for s in says), line


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0 and "--model.help" in capsys.readouterr().out
