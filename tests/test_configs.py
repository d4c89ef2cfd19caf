"""Every shipped config parses through the CLI (without loading models), alone and with the tiny overlay."""

from __future__ import annotations

import pytest
import yaml

from dynlab.cli import main
from dynlab.reproduce import STAGES as STAGES_OF_RECIPE
from dynlab.reproduce import run_of, stage_command, stage_configs
from tests.conftest import CONFIGS

# overlays (tiny, strategies, the reproduce recipe's per-stage overlays) are parsed stacked, below
STAGES = sorted(p for p in CONFIGS.rglob("*.yaml")
                if p.name not in ("tiny.yaml", "lora.yaml") and not {"strategies", "reproduce"} & set(p.parts))


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


@pytest.mark.parametrize("scale, sizes", [("cpu", None), ("cpu", CONFIGS / "reproduce" / "quick"), ("paper", None)])
@pytest.mark.parametrize("stage", STAGES_OF_RECIPE, ids=lambda s: s.name)
def test_every_reproduce_stage_parses_as_dynlab_reproduce_stacks_it(stage, scale, sizes, capsys, tmp_path):
    args = stage_command(stage, CONFIGS, scale, "rows.jsonl" if scale == "cpu" else None, tmp_path, [], [], sizes)
    cfg = _print_config(capsys, *args[1:])
    init = cfg["model"]["init_args"]
    assert (init.get("init_from") is not None) == (stage.parent is not None)
    assert cfg["trainer"]["default_root_dir"] == str(tmp_path)
    # dynlab reproduce knows where the stage's run lands: <out>/<the CSVLogger's name>/<the stage's fixed version>
    csv_logger = next(x for x in cfg["trainer"]["logger"] if x["class_path"].endswith("CSVLogger"))
    assert run_of(stage, stage_configs(stage, CONFIGS, scale, sizes)).parts[0] == csv_logger["init_args"]["name"]
    data = cfg["data"]["init_args"]
    if scale == "paper":
        assert data["source"] == "Anthropic/hh-rlhf" and init["policy"]["name_or_path"] == "EleutherAI/pythia-410m"
    else:
        assert data["source"] == "rows.jsonl" and data["num_train"] == 40 and data["rebuild_irr_train"] is True
        assert init["policy"]["name_or_path"] == "embedded:smollm2-135m-instruct"
        quick = sizes is not None
        assert data["probe_train_size"] == (4 if quick else 8)
        if stage.name == "dpo_onpolicy":  # the same DPO, y- sampled from the policy: no cache for sampled responses
            assert cfg["trainer"]["max_steps"] == (10 if quick else 40) and init["precompute_ref_logps"] is False
            assert init["negatives"] == "policy" and init["sampling"]["max_new_tokens"] == (48 if quick else 64)
        elif stage.name == "dpo_online":  # both responses sampled and ranked: no cache either
            assert cfg["trainer"]["max_steps"] == (10 if quick else 40) and init["precompute_ref_logps"] is False
            assert init["pairs"] == "policy_ranked" and init["sampling"]["num_samples"] == 2
            assert init["ranker"]  # DYNLAB_RANKER, or the embedded model as a logit judge
        elif stage.name == "dpo_sppo":  # the dataset's pairs under SPPO's square loss, the reference cached
            assert cfg["trainer"]["max_steps"] == (10 if quick else 40) and init["precompute_ref_logps"] is True
            assert init["loss_type"] == "sppo_hard"
        elif stage.base == "dpo":
            assert cfg["trainer"]["max_steps"] == (20 if quick else 40) and init["precompute_ref_logps"] is True
        else:
            assert cfg["trainer"]["max_steps"] == (30 if quick else 60)


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
