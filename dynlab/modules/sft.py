"""SFTModule: supervised finetuning on (prompt, chosen); ExtendSFTModule: the paper's extension, SFT on (prompt, chosen)
and (prompt, rejected) as separate examples, which lifts rejected responses out of the low-probability valley
before DPO.

    dynlab fit --config configs/sft.yaml
    dynlab fit --config configs/extend_sft.yaml
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from dynlab.losses.sft import sft_loss
from dynlab.models.forward import grouped_response_hidden
from dynlab.modules.base import CausalLMModule, uses_fsdp


class SFTModule(CausalLMModule):
    """Negative log-likelihood of the response tokens (prompt tokens masked).

    Args:
        reduction: ``token_mean`` (every response token weighs the same), ``sequence_mean``, ``sequence_sum``
            (each sequence's summed NLL averaged over the batch: the paper's objective, configs/paper) or ``sum``;
            see ``sft_loss``. Under DDP each gives the gradient one process computes on the whole batch.
        **kwargs: see CausalLMModule.
    """

    training_view: ClassVar[str] = "sft"

    def __init__(self, *args: Any,
                 reduction: Literal["token_mean", "sequence_mean", "sequence_sum", "sum"] = "token_mean",
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reduction = reduction

    def response_states(self, batch: dict[str, Tensor], model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """As the base class (token order aside), with the batch's rows grouped by length, one forward per group, so
        little of the work is padding."""
        if uses_fsdp(self._trainer):  # one forward per step under FSDP
            return super().response_states(batch, model)
        return grouped_response_hidden(model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logps, seq_index = self.response_token_logps(batch)
        loss = sft_loss(logps, seq_index, batch["input_ids"].shape[0], reduction=self.reduction)
        world = self.trainer.world_size
        if self.reduction == "sum" and world > 1:
            loss = loss * world  # DDP averages gradients over ranks; a sum over the global batch wants their sum
        elif world > 1:
            # DDP averages gradients over ranks; rescale so the result is the mean over ALL ranks' tokens
            # (token_mean), sequences (sequence_sum) or sequences with response tokens (sequence_mean), exactly what
            # one process on the whole batch computes (ranks hold different numbers of tokens, and of sequences in an
            # epoch's last batch)
            n = {"token_mean": logps.numel(), "sequence_sum": batch["input_ids"].shape[0],
                 "sequence_mean": seq_index.unique().numel()}[self.reduction]
            local = torch.tensor(float(n), device=logps.device)
            loss = loss * local * world / self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss


class ExtendSFTModule(SFTModule):
    """SFT on chosen AND rejected responses (the data module gives both as separate examples)."""

    training_view: ClassVar[str] = "extend"
