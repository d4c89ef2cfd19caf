"""GenerationMetrics: greedy responses to a few probe prompts at the probe cadence, logged as repetition statistics
(``generation/{metric}``) and saved as ``RUN_DIR/generations/step_XXXXXXXX.jsonl``.

    dynlab fit --config configs/dpo.yaml --trainer.callbacks+=dynlab.evaluation.callback.GenerationMetrics
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from dynlab.evaluation.repetition import summarize
from dynlab.modules.base import uses_fsdp


class GenerationMetrics(Callback):
    """Watch for the repeater while training: greedy responses to the first probe prompts of a split, at step 0,
    every N optimizer steps and at the last step (rank 0 only; generation holds no collective).

    Args:
        num_prompts: how many probe prompts (the first ones of ``split``).
        max_new_tokens: length limit of each response.
        every_n_steps: cadence in optimizer steps; None follows the module's ``probe_every_n_steps``.
        split: probe split the prompts come from (``test`` = held-out prompts).
        save_texts: also write the responses to ``RUN_DIR/generations/step_XXXXXXXX.jsonl``.
    """

    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 32, every_n_steps: int | None = None,
                 split: str = "test", save_texts: bool = True):
        self.num_prompts, self.max_new_tokens, self.every_n_steps = num_prompts, max_new_tokens, every_n_steps
        self.split, self.save_texts = split, save_texts
        self._last_step = -1

    def _every(self, pl_module: LightningModule) -> int:
        if self.every_n_steps is not None:
            return self.every_n_steps
        return int(getattr(pl_module.hparams, "probe_every_n_steps", 0) or 0)

    def _due(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        every, step = self._every(pl_module), trainer.global_step
        if not every or step == self._last_step:
            return False
        return step % every == 0 or step >= trainer.estimated_stepping_batches

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._due(trainer, pl_module):  # step 0: the model before any update
            self.generate_and_log(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._due(trainer, pl_module):
            self.generate_and_log(trainer, pl_module)

    def generate_and_log(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Generate now, log ``generation/{metric}`` at the current optimizer step; returns what was logged.

        The step counts as done only once its texts are logged and written: a run stopped while sampling (and
        checkpointed there) samples that step again when it resumes."""
        metrics = self._generate_and_log(trainer, pl_module, trainer.global_step)
        self._last_step = trainer.global_step
        return metrics

    def _generate_and_log(self, trainer: Trainer, pl_module: LightningModule, step: int) -> dict[str, float]:
        if not trainer.is_global_zero:
            return {}
        if uses_fsdp(trainer):
            warnings.warn("GenerationMetrics is skipped under FSDP (the policy's weights are sharded)", stacklevel=2)
            return {}
        examples = getattr(trainer.datamodule, "probe_examples", {}).get(self.split, [])[: self.num_prompts]
        if not examples:
            return {}
        texts = pl_module.generate([e["prompt_ids"] for e in examples], max_new_tokens=self.max_new_tokens,
                                   do_sample=False)
        metrics = {f"generation/{k}": v for k, v in summarize(texts).items() if k != "n" and not math.isnan(v)}
        for logger in pl_module.loggers:
            logger.log_metrics(metrics, step=step)
        if self.save_texts:
            from dynlab.tracking.trajectory import write_jsonl

            run_dir = Path(getattr(pl_module, "run_dir", None) or trainer.log_dir or trainer.default_root_dir)
            rows = getattr(trainer.datamodule, "probe_rows", {}).get(self.split, [])
            write_jsonl(run_dir / "generations" / f"step_{step:08d}.jsonl",
                        [{"step": step, "split": self.split, "prompt_index": e["index"],
                          "prompt": rows[e["index"]]["prompt"] if e["index"] < len(rows) else None, "response": t}
                         for e, t in zip(examples, texts)])
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step", -1)
