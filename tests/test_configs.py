"""Every shipped config parses through the CLI (without loading models), alone and with the tiny overlay."""

from __future__ import annotations

import pytest
import yaml

from dynlab.cli import main
from tests.conftest import CONFIGS

STAGES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name != "tiny.yaml" and "strategies" not in p.parts)


def _print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", STAGES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses(config, capsys):
    cfg = _print_config(capsys, "--config", str(config))
    assert cfg["model"]["class_path"].startswith("dynlab.modules.")
    assert cfg["data"]["class_path"] == "dynlab.data.ProbeDataModule"


@pytest.mark.parametrize("config", [p for p in STAGES if p.parent == CONFIGS], ids=lambda p: p.name)
def test_tiny_overlay_stacks(config, capsys):
    cfg = _print_config(capsys, "--config", str(config), "--config", str(CONFIGS / "tiny.yaml"),
                        "--model.init_args.probe_every_n_steps=2")
    assert cfg["model"]["init_args"]["policy"]["name_or_path"] == "tiny"
    assert cfg["model"]["init_args"]["probe_every_n_steps"] == 2
    assert cfg["data"]["init_args"]["num_train"] == 16


def test_omegaconf_interpolation(tmp_path, capsys):
    overlay = tmp_path / "interp.yaml"
    overlay.write_text("data:\n  init_args:\n    batch_size: 2\n    probe_batch_size: ${data.init_args.batch_size}\n")
    cfg = _print_config(capsys, "--config", str(CONFIGS / "sft.yaml"), "--config", str(overlay))
    assert cfg["data"]["init_args"]["probe_batch_size"] == 2


def test_paper_configs_carry_the_paper_settings(capsys):
    dpo = _print_config(capsys, "--config", str(CONFIGS / "paper" / "dpo.yaml"))
    opt = dpo["model"]["init_args"]["optimizer"]
    assert opt["class_path"] == "torch.optim.RMSprop" and opt["init_args"]["lr"] == 5e-7
    assert dpo["model"]["init_args"]["beta"] == 0.1
    assert dpo["data"]["init_args"]["batch_size"] == 2 and dpo["data"]["init_args"]["max_length"] == 512
    sched = dpo["model"]["init_args"]["scheduler"]
    assert sched["init_args"]["total_iters"] == 150


def test_fsdp_strategy_overlay_parses(capsys):
    cfg = _print_config(capsys, "--config", str(CONFIGS / "paper" / "dpo.yaml"),
                        "--config", str(CONFIGS / "strategies" / "fsdp.yaml"))
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["sharding_strategy"] == "FULL_SHARD" and cfg["trainer"]["precision"] == "bf16-mixed"
