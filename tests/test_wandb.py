"""W&B through the shipped configs: an offline run directory is written, and reading its transaction log back
gives the probe metrics, the training loss, the full resolved config and the figures."""

from __future__ import annotations

from pathlib import Path

from dynlab.tracking.wandb_offline import read_offline_run
from tests.conftest import CONFIGS, run_dynlab


def test_offline_run_holds_probe_metrics_and_config(in_tmp):
    # a fresh process, as a user runs it: W&B fixes its mode at the first init of a process
    proc = run_dynlab("fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
                      "--model.init_args.beta=0.25", cwd=in_tmp, env={"WANDB_MODE": "", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout  # WANDB_MODE unset: dynlab defaults W&B to offline
    offline = [Path(p) for p in Path("runs/dpo/wandb").glob("offline-run-*")]
    assert len(offline) == 1 and "W&B offline run:" in out and "wandb sync" in out
    run = read_offline_run(offline[0])
    probe_steps = [h for h in run["history"] if "probe/train/logp/chosen" in h]
    assert [h["trainer/global_step"] for h in probe_steps] == [0, 3, 6]
    assert all("probe/test/argmax_logp/rejected" in h for h in probe_steps)
    assert any("train/loss" in h for h in run["history"])
    logged = {k for h in run["history"] for k in h}
    assert {"figures/squeezing/_type", "figures/probe_dlogp/_type"} <= logged  # the end-of-fit figures, as images
    config = run["config"]
    assert config["model"]["class_path"] == "dynlab.modules.DPOModule"
    assert config["model"]["init_args"]["beta"] == 0.25
    assert config["data"]["init_args"]["num_train"] == 16 and config["trainer"]["max_steps"] == 6
