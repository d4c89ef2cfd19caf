"""The command tells you what it can do: ``dynlab --help`` lists every subcommand, one line each; a run's output
carries no message a user cannot act on, while other warnings still get through."""

from __future__ import annotations

import logging
import re
import warnings

import pytest

from dynlab.cli import SUBCOMMANDS, main, quiet_noise
from tests.conftest import CONFIGS, run_dynlab


def test_help_lists_every_subcommand_one_line_each(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    listed = {m.group(1): m.group(2) for m in re.finditer(r"^  ([\w-]+) +(\S.*)$", out, flags=re.M)}
    assert set(listed) == {"fit", "validate", "test", *SUBCOMMANDS}
    assert all(len(line) < 110 for line in out.splitlines())


def test_no_subcommand_prints_the_list_and_fails(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "sweep" in capsys.readouterr().err


def test_a_subcommand_keeps_its_own_help(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--trainer.max_steps" in capsys.readouterr().out


def test_only_the_exact_noise_is_filtered(caplog):
    quiet_noise()
    with pytest.warns(FutureWarning, match="another deprecation"):
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_a_run_prints_no_noise_and_counts_steps_of_max_steps(tmp_path):
    proc = run_dynlab("fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
                      "--trainer.enable_progress_bar=true", cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for noise in ("litlogger", "LeafSpec", "/-2", "anonymous setting"):
        assert noise not in output, noise
    assert re.search(r"steps .* 6/6 ", output)  # the bar counts the 6 steps of max_steps
