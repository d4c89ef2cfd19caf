"""Stops: a SIGTERM or SIGINT ends a run within seconds wherever it lands (training step, probe evaluation, sampling,
export), leaves only whole files and resumable checkpoints, exits non-zero, and a run resumed with
``--ckpt_path=last`` finishes what the stopped one left undone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from dynlab.cli import main
from dynlab.models.generate import generate_responses
from dynlab.models.load import load_model, load_tokenizer
from tests.conftest import CONFIGS

TINY = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]


def callbacks(*specs: dict) -> str:
    return f"--trainer.callbacks={json.dumps(list(specs))}"


def checkpoint_every(n: int) -> dict:
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": n, "save_top_k": 0, "save_last": True}}


def trajectory_steps(run: Path) -> list[int]:
    return sorted(int(p.stem.removeprefix("step_")) for p in (run / "probes" / "trajectory").glob("step_*.parquet"))


def no_temporary_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if p.name.startswith((".step-", ".export-", ".probe_"))]


# ---- a real signal to a `dynlab fit` process, during a probe evaluation -------------------------------------------
# A probe evaluation of several seconds (many small batches and projection chunks), and a checkpoint at every step:
# the first last.ckpt is step 1's, written at its batch end just before step 1's probe evaluation starts.
SLOW_PROBES = [*TINY, "--trainer.max_steps=2", "--model.init_args.probe_every_n_steps=1",
               "--data.init_args.num_train=32", "--data.init_args.num_heldout=16", "--data.init_args.probe_size=6",
               "--data.init_args.probe_batch_size=1", "--model.init_args.probe_chunk_tokens=1",
               callbacks(checkpoint_every(1))]


def start_fit(cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dynlab.cli", *SLOW_PROBES], cwd=cwd, text=True,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(proc: subprocess.Popen, pattern: str, run: Path) -> None:
    """Until ``run`` holds a file matching ``pattern`` (while ``proc`` lives), then a moment more."""
    deadline = time.monotonic() + 600
    while not list(run.glob(pattern)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    time.sleep(0.3)


def stop(proc: subprocess.Popen, signum: int) -> tuple[float, str]:
    """Send ``signum``; the seconds until the process ended, and its stderr."""
    proc.send_signal(signum)
    sent = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return time.monotonic() - sent, err


def assert_stopped_in_step_1_evaluation(run: Path, proc: subprocess.Popen, waited: float, err: str,
                                        exit_code: int) -> None:
    # step 1 was trained and checkpointed; its evaluation was cut short and left nothing
    assert trajectory_steps(run) == [0], err[-3000:]
    assert waited < 10, f"{waited:.1f} s after the signal"
    assert proc.returncode == exit_code, err[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    assert not (run / "export").exists() and not no_temporary_files(run)


@pytest.mark.parametrize(("signum", "exit_code"), [
    (signal.SIGTERM, 128 + signal.SIGTERM),
    pytest.param(signal.SIGINT, 1, marks=pytest.mark.slow),  # Lightning's KeyboardInterrupt shutdown exits 1
], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_probe_evaluation_stops_the_run_within_seconds(in_tmp, monkeypatch, signum, exit_code):
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "stopped")
    run = in_tmp / "runs" / "dpo" / "stopped"
    proc = start_fit(in_tmp)
    wait_for(proc, "checkpoints/last.ckpt", run)
    waited, err = stop(proc, signum)
    assert_stopped_in_step_1_evaluation(run, proc, waited, err, exit_code)
    main([*SLOW_PROBES, "--ckpt_path=last"])
    assert trajectory_steps(run) == [0, 1, 2]
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_under_slurm_sigusr1_still_checkpoints_and_the_requeue_sigterm_stops_the_job(in_tmp, monkeypatch):
    # what Slurm does at --signal=SIGUSR1@90: Lightning's handler saves hpc_ckpt_N.ckpt where the signal lands (here
    # in a probe evaluation) and calls scontrol requeue (absent here: it only logs that); Slurm's SIGTERM follows
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "slurm-7")
    run = in_tmp / "runs" / "dpo" / "slurm-7"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "dynlab", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    proc = start_fit(in_tmp, slurm)
    wait_for(proc, "checkpoints/last.ckpt", run)
    proc.send_signal(signal.SIGUSR1)
    wait_for(proc, "hpc_ckpt_*.ckpt", run)
    waited, err = stop(proc, signal.SIGTERM)
    assert "Handling auto-requeue signal" in err and "Bypassing SIGTERM" in err
    assert_stopped_in_step_1_evaluation(run, proc, waited, err, 128 + signal.SIGTERM)
    hpc = torch.load(next(run.glob("hpc_ckpt_*.ckpt")), weights_only=False)
    assert hpc["global_step"] == 1 and hpc["dynlab_last_probe_step"] == 0
    assert not any(torch.isnan(b).all() for b in hpc["dynlab_probe_baseline"].values())
    main([*SLOW_PROBES, "--ckpt_path=last"])  # the requeued job: resumes from the newest, the hpc checkpoint
    assert trajectory_steps(run) == [0, 1, 2]
    assert (run / "export" / "model.safetensors").is_file()


# ---- in-process: a real SIGTERM sent at a chosen point of the run --------------------------------------------------
class SigtermAt(Callback):
    """Sends this process SIGTERM from a callback hook (which Lightning runs before the module's), at ``step``."""

    def __init__(self, hook: str, step: int):
        self.hook, self.step = hook, step

    def _maybe(self, hook: str, trainer) -> None:
        if hook == self.hook and trainer.global_step == self.step:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # Lightning's handler, not death
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs in the main thread at the next bytecode

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe("on_train_batch_end", trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._maybe("on_train_end", trainer)


def sigterm_at(hook: str, step: int) -> dict:
    return {"class_path": "tests.test_signals.SigtermAt", "init_args": {"hook": hook, "step": step}}


LAST_STEP = [*TINY, "--trainer.max_steps=2", "--model.init_args.probe_every_n_steps=1"]


@pytest.mark.parametrize("hook", ["on_train_batch_end", "on_train_end"], ids=["last-evaluation", "export"])
def test_a_run_stopped_at_its_last_step_is_finished_by_its_resume(in_tmp, monkeypatch, hook):
    # the checkpoint of the last step is written, then SIGTERM: during the last probe evaluation or the export
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "last")
    run = in_tmp / "runs" / "dpo" / "last"
    with pytest.raises(SystemExit) as stopped:
        main([*LAST_STEP, callbacks(checkpoint_every(2), sigterm_at(hook, 2))])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not (run / "export").exists() and not no_temporary_files(run)
    assert trajectory_steps(run) == ([0, 1] if hook == "on_train_batch_end" else [0, 1, 2])
    # resumed: nothing left to train, Lightning skips on_train_end; the module finishes the run anyway
    main([*LAST_STEP, callbacks(checkpoint_every(2)), "--ckpt_path=last"])
    assert trajectory_steps(run) == [0, 1, 2]
    assert (run / "figures").is_dir()
    exported = load_file(run / "export" / "model.safetensors")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(v, state[f"policy.{k}"]) for k, v in exported.items())


def test_sigterm_stops_sampling_between_two_tokens(in_tmp, monkeypatch):
    # GenerationMetrics samples at every step; SIGTERM arrives just before its step-1 generation, which runs before
    # Lightning's checkpoint callbacks: the step-1 checkpoint is still written
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "gen")
    run = in_tmp / "runs" / "dpo" / "gen"
    generation = {"class_path": "dynlab.evaluation.callback.GenerationMetrics",
                  "init_args": {"every_n_steps": 1, "max_new_tokens": 8}}
    args = [*TINY, "--trainer.max_steps=3", "--model.init_args.probe_every_n_steps=0"]
    with pytest.raises(SystemExit) as stopped:
        main([*args, callbacks(checkpoint_every(1), sigterm_at("on_train_batch_end", 1), generation)])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in (run / "generations").glob("*.jsonl")) == ["step_00000000.jsonl"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    assert not no_temporary_files(run)
    # the interrupted step-1 generation is not counted as done: the resumed run samples it
    main([*args, callbacks(checkpoint_every(1), generation), "--ckpt_path=last"])
    assert sorted(p.name for p in (run / "generations").glob("*.jsonl")) == [f"step_{s:08d}.jsonl" for s in range(4)]


def test_generation_checks_for_a_stop_after_every_token(tiny_spec):
    tokenizer, model = load_tokenizer(tiny_spec), load_model(tiny_spec).train()
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    prompts = [tokenizer("Human: hi\n\nAssistant:")["input_ids"]] * 3
    with pytest.raises(KeyboardInterrupt):
        generate_responses(model, tokenizer, prompts, max_new_tokens=50, batch_size=2, check=check)
    assert len(calls) == 5 and model.training  # one call before the batch, then one per token; mode restored
    assert len(generate_responses(model, tokenizer, prompts, max_new_tokens=4, check=lambda: None)) == 3


def test_a_checkpoint_saved_during_the_step_0_evaluation_carries_no_half_baseline(in_tmp, monkeypatch):
    # Lightning's Slurm SIGUSR1 handler saves wherever the signal lands: here after the first probe batch of step 0
    from dynlab.modules.base import CausalLMModule

    probe_step, calls = CausalLMModule.probe_step, []

    def probe_step_then_save(self, split, batch):
        out = probe_step(self, split, batch)
        calls.append(split)
        if len(calls) == 1:
            self.trainer.save_checkpoint(in_tmp / "hpc_ckpt_1.ckpt")
        return out

    monkeypatch.setattr(CausalLMModule, "probe_step", probe_step_then_save)
    main([*TINY, "--trainer.max_steps=1", callbacks(checkpoint_every(1))])
    saved = torch.load(in_tmp / "hpc_ckpt_1.ckpt", weights_only=False)
    assert saved["dynlab_last_probe_step"] == -1  # the resumed run evaluates step 0 again, and records it whole
    assert all(torch.isnan(b).all() for b in saved["dynlab_probe_baseline"].values())
    last = torch.load(next(in_tmp.glob("runs/dpo/*/checkpoints/last.ckpt")), weights_only=False)
    assert not any(torch.isnan(b).any() for b in last["dynlab_probe_baseline"].values())


def test_an_export_interrupted_midway_leaves_no_directory(tmp_path):
    from dynlab.modules.base import export_pretrained

    class Interrupted:
        def save_pretrained(self, path, **kwargs):
            (Path(path) / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_pretrained(Interrupted(), None, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []
