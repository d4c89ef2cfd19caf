"""Slow tier: FSDP on CPU (gloo). 2-rank FSDP through a real `dynlab fit` subprocess gives the probe numbers of one
process, each probe row counted once, with shards of unequal length (so the padding forwards run), also when stopped
after a checkpoint and resumed in place as a requeued job is; the forward count the padding relies on; what FSDP still
refuses; the DPO reference FSDP does not shard."""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import pandas as pd
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from dynlab.dynamics import DynamicsCallback
from dynlab.errors import InputError
from dynlab.models import forward
from dynlab.models.load import load_model
from dynlab.modules import DPOModule, SFTModule
from dynlab.tracking.trajectory import KEY_COLUMNS, read_trajectory
from tests import test_ddp
from tests.conftest import REPO, run_dynlab
from tests.test_ddp import fit, metrics

pytestmark = pytest.mark.slow


@contextmanager
def _state_dicts_kept_in_place():
    """Lightning's full state dicts under FSDP with ``offload_to_cpu=False``: offloading a tensor that is already on
    the CPU frees the very storage the state dict then clones (a segfault)."""
    import lightning.pytorch.strategies.fsdp as pl_fsdp
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    def context(module, world_size, rank0_only=True):
        return FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                                    state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                    optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False,
                                                                                     rank0_only=rank0_only))

    with mock.patch.object(pl_fsdp, "_get_full_state_dict_context", context):
        yield


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on the CPU: Lightning lets a subclass (only) select it there, but passes FSDP
    ``device_id=None`` on CPU, which FSDP refuses without an accelerator; this one passes the CPU device, and keeps
    the full state dicts (checkpoint, export) where they are."""

    def _setup_model(self, model):
        from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def lightning_module_state_dict(self):
        with _state_dicts_kept_in_place():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer):
        with _state_dicts_kept_in_place():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, *args, **kwargs):
        with _state_dicts_kept_in_place():
            return super().load_checkpoint(*args, **kwargs)


STRATEGY = ('--trainer.strategy={"class_path": "tests.test_fsdp.CPUFSDPStrategy", "init_args": {"auto_wrap_policy": '
            '["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]}}')
# 5 probe rows in batches of 2: rank 0 scores rows 0, 2, 4 in two batches, rank 1 rows 1, 3 in one (plus one empty)
PROBES = ("--data.init_args.probe_size=5", "--data.init_args.probe_batch_size=2", "--trainer.gradient_clip_val=null")
CHECKPOINT_EVERY_3 = ('--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                      '"init_args": {"every_n_train_steps": 3, "save_top_k": 0, "save_last": true}}]')


@pytest.mark.parametrize(("stage", "requeued"), [("sft", True), ("dpo", False)], ids=["sft-requeued", "dpo"])
def test_two_fsdp_ranks_match_one_process(stage, requeued, tmp_path, monkeypatch):
    """sft-requeued: the FSDP run is stopped after step 3 and resumed in place to step 6 (``--ckpt_path=last`` in
    a fixed run directory, what a requeued Slurm job does): the same steps, rows and numbers as an uninterrupted run
    in one process."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    one, t1 = fit(tmp_path / "one", stage, *PROBES, "--trainer.devices=1", "--data.init_args.batch_size=4")
    fsdp = (*PROBES, "--trainer.devices=2", STRATEGY, "--data.init_args.batch_size=2")
    if requeued:
        monkeypatch.setenv("DYNLAB_RUN_VERSION", "requeued")
        fsdp = (*fsdp, CHECKPOINT_EVERY_3, "--ckpt_path=last")
        fit(tmp_path / "two", stage, *fsdp, "--trainer.max_steps=3")  # "killed" after step 3's checkpoint
        assert not (tmp_path / "two" / "runs" / stage / "requeued" / "probes" / "trajectory" /
                    "step_00000006.parquet").exists()
    procs = []  # what each `dynlab fit` printed

    def run_and_keep(*args, **kwargs):
        procs.append(run_dynlab(*args, **kwargs))
        return procs[-1]

    monkeypatch.setattr(test_ddp, "run_dynlab", run_and_keep)
    two, t2 = fit(tmp_path / "two", stage, *fsdp)
    assert ("Restored all states from the checkpoint" in procs[-1].stderr) == requeued
    print(f"{stage}: 1 process {t1:.1f}s, 2 FSDP ranks {t2:.1f}s")
    with open(two / "metrics.csv") as f:  # every step exactly once, a requeued run's too (not trained again)
        assert sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")) == list(range(6))
    m1, m2 = metrics(one), metrics(two)
    probe = [k for k in m1.columns if k.startswith("probe/")]
    train = [k for k in m1.columns if k.startswith("train/")]
    assert probe and set(probe + train) <= set(m2.columns)
    assert list(m1[probe].dropna(how="all").index) == [0, 3, 6]
    pd.testing.assert_frame_equal(m1[probe], m2[probe], rtol=1e-5, atol=1e-5)
    pd.testing.assert_frame_equal(m1[train], m2[train], rtol=1e-4, atol=1e-4)  # sharded gradients: summed otherwise
    # the trajectory: written once (rank 0), every probe row of every split and type exactly once, same numbers
    t1_, t2_ = read_trajectory(one), read_trajectory(two)
    assert not t2_.duplicated(list(KEY_COLUMNS)).any() and len(t1_) == len(t2_)
    assert set(t2_["row"]) == set(range(5))
    t1_, t2_ = t1_.reset_index(drop=True), t2_.reset_index(drop=True)
    cols = [*KEY_COLUMNS, "logp", "argmax_logp", "entropy"]
    pd.testing.assert_frame_equal(t1_[cols], t2_[cols], rtol=1e-5, atol=1e-5)
    # dlogp is a difference of two log-probs (|logp| ~ 450 here, a float32 ulp 3e-5): within 1e-5 of their size
    pd.testing.assert_series_equal(t1_["dlogp"], t2_["dlogp"], rtol=0, atol=1e-5 * t1_["logp"].abs().max())
    assert (two / "export" / "model.safetensors").is_file()
    assert not (tmp_path / "two" / "runs" / stage / "version_1").exists()  # one run directory, not one per rank


def test_fsdp_overlay_bf16_mixed_dpo_reference_is_the_step_0_policy(tmp_path, monkeypatch):
    """configs/strategies/fsdp.yaml on 2 CPU ranks (bf16-mixed: FSDP computes with bf16 weights; Lightning's
    activation checkpointing; probes on): the unsharded reference computes in the policy's dtype, so at step 0 the
    DPO logit is exactly 0 (loss log 2), and probe evaluation runs with checkpointed layers."""
    import math

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    layer = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"
    strategy = ('--trainer.strategy={"class_path": "tests.test_fsdp.CPUFSDPStrategy", "init_args": '
                f'{{"sharding_strategy": "FULL_SHARD", "state_dict_type": "full", "auto_wrap_policy": ["{layer}"], '
                f'"activation_checkpointing_policy": ["{layer}"]}}}}')
    run, _ = fit(tmp_path, "dpo", "--config", str(REPO / "configs" / "strategies" / "fsdp.yaml"), strategy,
                 "--trainer.accelerator=cpu", "--trainer.devices=2", "--data.init_args.batch_size=2",
                 *PROBES[:2], "--trainer.max_steps=3")
    m = metrics(run)
    assert m.loc[0, "train/loss"] == pytest.approx(math.log(2), abs=1e-7) and m.loc[0, "train/rewards/margin"] == 0
    probes = m.dropna(subset=["probe/train/logp/chosen"])
    logps = probes.filter(regex=r"^probe/(train|test)/logp/")
    assert list(probes.index) == [0, 3] and logps.shape[1] > 2 and logps.map(math.isfinite).all().all()


@pytest.mark.parametrize("kv_cache", [True, False], ids=["shared-cache", "row-by-row"])
def test_backbone_forward_count_is_the_forwards_made(kv_cache, tiny_spec):
    """``backbone_forward_count`` (what the FSDP padding plans with) against the backbone forwards that
    ``shared_prompt_hidden_rows`` actually makes, counted by a hook, over rows of many lengths."""
    model = load_model(tiny_spec).eval()
    calls = []
    model.base_model.register_forward_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(3, 200, (n,), generator=gen)

    with mock.patch.object(forward, "shares_kv_cache", lambda _: kv_cache):
        for trial in range(12):
            rows = int(torch.randint(1, 7, (), generator=gen))
            prompts = [ids(int(torch.randint(1, 30, (), generator=gen))) for _ in range(rows)]
            responses = [{t: ids(int(torch.randint(1, 40, (), generator=gen))) for t in ("chosen", "rejected", "x")}
                         for _ in range(rows)]
            for max_padding, max_tokens in ((0.1, 4096), (0.25, 64)):
                calls.clear()
                list(forward.shared_prompt_hidden_rows(model, prompts, responses, max_padding, max_tokens))
                assert forward.backbone_forward_count(model, prompts, responses, max_padding, max_tokens) == len(calls)
        assert forward.backbone_forward_count(model, [], []) == 0


def fsdp_trainer(**extra) -> SimpleNamespace:
    return SimpleNamespace(strategy=CPUFSDPStrategy(), accumulate_grad_batches=1, **extra)


def test_dynamics_callback_validate_and_entanglement_are_refused_under_fsdp(tiny_spec):
    with pytest.raises(InputError, match="field 'trainer.strategy': DynamicsCallback under FSDP is not supported"):
        DynamicsCallback().check_strategy(fsdp_trainer())
    module = SFTModule(policy=tiny_spec)  # probes on: no longer refused
    module.check_strategy(fsdp_trainer(callbacks=[]))
    with pytest.raises(InputError, match="DynamicsCallback under FSDP"):  # before the run directory, through dynlab
        module.check_strategy(fsdp_trainer(callbacks=[DynamicsCallback()]))
    with pytest.raises(InputError, match="dynlab validate under FSDP is not supported"):
        module.check_strategy(fsdp_trainer(state=SimpleNamespace(fn="validate")))
    with pytest.raises(InputError, match="field 'model.probe_entanglement_pairs': gradient entanglement under FSDP"):
        SFTModule(policy=tiny_spec, probe_entanglement_pairs=2).check_strategy(fsdp_trainer())


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_dynamics_callback_under_fsdp_is_refused_before_anything_is_written(stage, in_tmp, capsys):
    """Through ``dynlab fit``: probes under FSDP pass the strategy check now, DynamicsCallback does not."""
    from tests.test_bad_input import GOOD, fails_with, fit_args, write_rows

    strategy = f'--trainer.strategy={{"class_path": "{__name__}.CPUFSDPStrategy"}}'
    line = fails_with(capsys, fit_args(write_rows(in_tmp / "p.jsonl", [GOOD] * 5), strategy,
                                       "--trainer.accelerator=cpu", "--trainer.devices=1",
                                       "--trainer.callbacks+=dynlab.dynamics.DynamicsCallback", stage=stage))
    assert line.startswith("dynlab: error: field 'trainer.strategy': DynamicsCallback under FSDP"), line
    assert "DDP" in line and list(in_tmp.iterdir()) == [in_tmp / "p.jsonl"]  # no W&B run either


def test_dpo_reference_is_outside_the_module_tree_fsdp_shards(tiny_spec):
    """Lightning's FSDP wraps the LightningModule's tree: the reference, kept outside it, stays whole on every rank
    (memory_estimate(reference="live")), or is freed by precompute_ref_logps."""
    module = DPOModule(policy=tiny_spec)
    tree = {id(p) for p in module.parameters()}
    assert not any(id(p) in tree for p in module.reference.parameters())
    assert not any(name.startswith("_reference") for name, _ in module.named_modules())
