"""DPOModule: off-policy preference learning — DPO (and cDPO, IPO, hinge, SLiC-HF, SPPO, DPOP, RPO) against a frozen
reference equal to the initial policy (with a LoRA adapter: the policy itself with the adapter disabled, so the base
weights are in memory once), or the reference-free SimPO (no reference at all).

    dynlab fit --config configs/dpo.yaml
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dynlab.errors import InputError
from dynlab.losses.dpo import REFERENCE_FREE, DPOArgumentError, LossType, check_dpo_args, dpo_loss
from dynlab.losses.logps import IGNORE_INDEX
from dynlab.models.forward import pair_rows, shared_prompt_hidden_rows, shares_kv_cache
from dynlab.modules.base import CausalLMModule, disable_dropout, uses_fsdp


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference: the same weights, no gradients, eval mode and dropout explicitly 0."""
    reference = disable_dropout(copy.deepcopy(model))
    return reference.requires_grad_(False).eval()


class DPOModule(CausalLMModule):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs.

    Args:
        beta: strength of the implicit KL penalty.
        label_smoothing: cDPO's assumed label-noise rate (sigmoid loss only).
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``slic`` (SLiC-HF), ``sppo_hard`` (SPPO), ``dpop``
            (DPO-Positive, Smaug), ``rpo`` (DPO + NLL on chosen) or ``simpo`` (reference-free, length-normalised:
            no reference model is built or run); formulas in ``dynlab.losses.dpo.dpo_loss``.
        precompute_ref_logps: compute the reference log-probs of every training pair once at the start of fit and
            free the reference model (saves a forward per step and the reference's memory).
        delta: ``slic``'s hinge margin on the log-ratio margin.
        nll_weight: weight of the per-token NLL of the chosen response in ``slic`` (SLiC-HF's lambda) and ``rpo``
            (RPO's alpha).
        dpop_lambda: ``dpop``'s penalty weight on log pi_ref(y+) - log pi(y+) > 0.
        gamma: ``simpo``'s target margin of the length-normalised rewards (set it with beta: SimPO uses beta 2-10).
        **kwargs: see CausalLMModule.
    """

    training_view: ClassVar[str] = "dpo"

    def __init__(self, *args: Any, beta: float = 0.1, label_smoothing: float = 0.0,
                 loss_type: LossType = "sigmoid", precompute_ref_logps: bool = False, delta: float = 1.0,
                 nll_weight: float = 1.0, dpop_lambda: float = 50.0, gamma: float = 0.5, **kwargs: Any):
        # refused before the weights load (dpo_loss would only refuse them at the first training step)
        try:
            check_dpo_args(beta, label_smoothing, loss_type, delta=delta, nll_weight=nll_weight,
                           dpop_lambda=dpop_lambda, gamma=gamma)
        except DPOArgumentError as err:
            raise InputError(err.message, field=f"model.{err.argument}") from None
        if precompute_ref_logps and loss_type in REFERENCE_FREE:
            raise InputError(f"loss_type {loss_type!r} has no reference model whose log-probs could be precomputed: "
                             "drop precompute_ref_logps", field="model.precompute_ref_logps")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        # kept out of the module tree: not trained, not checkpointed (it is rebuilt from the initial weights); with
        # an adapter the frozen base under the policy's LoRA layers is the reference (reference_sequence_logps)
        self.reference_free = loss_type in REFERENCE_FREE  # simpo: no reference is built, run or checkpointed
        no_copy = self.reference_free or self.peft_model is not None
        self._reference: list[nn.Module] = [] if no_copy else [frozen_copy(self.policy)]
        self.ref_logps: Tensor | None = None  # (pairs, 2) when precomputed

    @property
    def reference(self) -> nn.Module:
        return self._reference[0]

    @torch.no_grad()
    def reference_sequence_logps(self, batch: dict[str, Tensor]) -> Tensor:
        """The reference's summed response log-probs: batch (B, T) -> (B,). With an adapter, the policy with the
        adapter disabled, in eval mode (the LoRA dropout off; the train mode is restored after)."""
        if self.peft_model is None:
            return self.sequence_logps(batch, self.reference)
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.peft_model.disable_adapter():
                return self.sequence_logps(batch, self.policy)
        finally:
            self.policy.train(was_training)

    def on_fit_start(self) -> None:
        if self.ref_logps is None and self._reference:
            self.reference.to(self.device)
        if self.hparams.precompute_ref_logps and self.ref_logps is None:
            self.ref_logps = self._precompute_ref_logps()
        if self.ref_logps is not None:
            self.ref_logps = self.ref_logps.to(self.device)
            self._reference.clear()  # the cache replaces the model

    @torch.no_grad()
    def _precompute_ref_logps(self) -> Tensor:
        """The reference's (chosen, rejected) log-probs of every training pair, (pairs, 2), for the cache.

        A sequence's float32 log-prob depends on the batch it is computed in (padding width, the other rows, how
        the matmuls block) by ~1e-6 relative, so the cache is built on the very batches the first epoch trains on
        (the training sampler for epoch 0) and under training's precision context: through the first epoch every
        cached value is bitwise the live reference's, and at step 0, where policy = reference, the DPO logit is
        exactly 0 (loss log 2 for ``sigmoid``). Later epochs batch the pairs differently and read the first epoch's
        values, a float32-rounding difference from a live reference. A run resumed from a checkpoint without a
        cache (no step 0 left to match) computes it in training-set order.
        """
        datamodule = self.trainer.datamodule
        with self.trainer.precision_plugin.forward_context():
            first_epoch = datamodule.train_dataloader() if self.trainer.global_step == 0 else []
            cache, count = self._reference_logps_on(first_epoch)
            missing = count == 0  # the same on every rank (reduced)
            if missing.any():
                ordered, _ = self._reference_logps_on(datamodule.ordered_train_dataloader(), only=missing)
                cache[missing] = ordered[missing]
        return cache

    def _reference_logps_on(self, loader: Any, only: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Reference log-probs of the pairs in ``loader``'s batches (skipping batches with no pair in ``only``),
        reduced over ranks: ``(cache (pairs, 2), count (pairs,))``; a pair two ranks computed (DistributedSampler
        pads a shard by repeating pairs) gets their mean, one no rank computed has count 0."""
        n = len(self.trainer.datamodule.train_examples)
        cache = torch.zeros(n, 2, device=self.device)
        count = torch.zeros(n, device=self.device)
        for batch in loader:
            index = batch["index"].to(self.device)
            if only is not None and not only[index].any():
                continue
            batch = {k: v.to(self.device) for k, v in batch.items()}
            cache.index_add_(0, index, torch.stack(self.reference_sequence_logps(batch).chunk(2), dim=1))
            count.index_add_(0, index, torch.ones_like(index, dtype=count.dtype))
        strategy = self.trainer.strategy
        cache, count = strategy.reduce(cache, reduce_op="sum"), strategy.reduce(count, reduce_op="sum")
        return cache / count.clamp(min=1)[:, None], count  # x / 1 is exact

    def response_states(self, batch: dict[str, Tensor], model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """As the base class (token order aside), but each pair's prompt runs once, its KV cache serving both the
        chosen and the rejected response, and responses are grouped by length: the same numbers for less work."""
        # one dropout mask for both rows of a pair would change training; FSDP shards the policy per forward call
        lora_dropout = self.adapter_spec is not None and self.adapter_spec.dropout > 0
        dropout = model is self.policy and (self.hparams.dropout or (lora_dropout and model.training))
        rows = None
        if not dropout and not uses_fsdp(self._trainer) and shares_kv_cache(model):
            rows = pair_rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
        if rows is None:
            return super().response_states(batch, model)
        half = len(rows[0])
        hidden, targets, seq_index = [], [], []
        for members, h, y, member_index in shared_prompt_hidden_rows(model, *rows):
            # batch row of each member: chosen of pair k is row k, its rejected row B + k
            batch_row = torch.tensor([k + half * (name == "rejected") for k, name in members], device=h.device)
            hidden.append(h)
            targets.append(y)
            seq_index.append(batch_row[member_index])
        return torch.cat(hidden), torch.cat(targets), torch.cat(seq_index)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        policy_chosen, policy_rejected = self.sequence_logps(batch).chunk(2)
        if self.reference_free:
            ref_chosen = ref_rejected = None
        elif self.ref_logps is not None:
            ref_chosen, ref_rejected = self.ref_logps.to(self.device)[batch["index"]].unbind(1)
        else:
            ref_chosen, ref_rejected = self.reference_sequence_logps(batch).chunk(2)
        hp = self.hparams
        # response tokens per row (chosen rows first, as the log-probs): slic, rpo and simpo normalise by them
        chosen_lengths, rejected_lengths = (batch["labels"] != IGNORE_INDEX).sum(dim=1).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=hp.beta,
            label_smoothing=hp.label_smoothing, loss_type=hp.loss_type, chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, delta=hp.get("delta", 1.0), nll_weight=hp.get("nll_weight", 1.0),
            dpop_lambda=hp.get("dpop_lambda", 50.0), gamma=hp.get("gamma", 0.5))
        loss = losses.mean()
        n = losses.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict({
            "train/rewards/chosen": chosen_rewards.mean(),
            "train/rewards/rejected": rejected_rewards.mean(),
            "train/rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "train/rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "train/logps/chosen": policy_chosen.detach().mean(),
            "train/logps/rejected": policy_rejected.detach().mean(),
        }, batch_size=n, sync_dist=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ref_logps is not None:
            checkpoint["dynlab_ref_logps"] = self.ref_logps.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "dynlab_ref_logps" in checkpoint:
            self.ref_logps = checkpoint["dynlab_ref_logps"].to(self.device)
