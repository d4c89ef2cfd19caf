"""``DynamicsCallback``: at the probe cadence, predict each probe response's Δ log π over the next optimizer step from
first principles and compare it with what the step actually did.

    dynlab fit --config configs/dpo.yaml --trainer.callbacks+=dynlab.dynamics.DynamicsCallback
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from dynlab.dynamics.influence import directional_change, gradient_similarity, pack, sequence_logps
from dynlab.errors import InputError
from dynlab.tracking.trajectory import DYNAMICS_DIR, add_step_columns


class DynamicsCallback(Callback):
    """First-order influence of one update, measured on a small subset of probe examples (PAPER_NOTES §1).

    At every ``every_n_steps``-th optimizer step s (default: the module's probe cadence, step 0 included) it keeps
    θ_s and log π_s(y_o | x_o) for the first ``num_examples`` rows of the ``split`` probe set, every probe type; after
    step s + 1 it logs, per type, the mean of

    - ``observed``: log π_{s+1}(y_o | x_o) − log π_s(y_o | x_o);
    - ``predicted``: ⟨∇θ log π_s(y_o | x_o), θ_{s+1} − θ_s⟩, the first-order prediction from the actual update (any
      optimizer), computed with one forward-mode pass (no per-example gradient is stored);
    - ``predicted_sgd``: −η ⟨∇θ log π_s(y_o | x_o), ∇θ L_u⟩, the SGD form with the step's learning rate and its
      (unclipped, accumulated) gradient;
    - ``rel_error``: the median of |predicted − observed| / |observed|;

    as ``dynamics/{split}/{quantity}/{type}``, plus ``dynamics/{split}/corr`` (Pearson, all examples),
    ``dynamics/{split}/median_rel_error``, ``dynamics/seconds`` (the callback's cost) and
    ``dynamics/seconds_similarity`` (the part of it spent on the similarity matrix). Per-example values are added
    to the step's trajectory file as ``dyn_observed``, ``dyn_predicted`` and ``dyn_predicted_sgd``.

    With ``similarity``, it also writes the cosine similarity of ∇θ log π(y | x) between all probe types of each of
    those prompts (their mean in ``probes/dynamics/similarity_step_XXXXXXXX.json``): which responses move together.
    Those gradients are held for one prompt at a time, restricted to the parameters matching
    ``similarity_params`` (a regex; None = all) — for SmolLM2, e.g. ``layers\\.(2[6-9])\\.``, the last 4 of 30
    blocks, keeps it near 0.6 GB.

    Memory: two copies of the trainable parameters (θ_s and the step's gradient) for the duration of one step; the
    work runs on global rank 0 only (the other ranks continue and wait at the next collective).

    Args:
        every_n_steps: cadence in optimizer steps; None = the module's ``probe_every_n_steps``.
        split: probe split to observe (``train`` or ``test``).
        num_examples: probe rows observed (all their probe types).
        types: probe types to observe; None = all of the split's.
        sgd_form: also compute the SGD-form prediction (keeps a copy of the gradient).
        similarity: also write the gradient-similarity matrix.
        similarity_params: regex of the parameters the similarity gradients are taken over; None = all.
        max_tokens: tokens per observation batch in the forward passes.
    """

    def __init__(self, every_n_steps: int | None = None, split: str = "train", num_examples: int = 4,
                 types: list[str] | None = None, sgd_form: bool = True, similarity: bool = True,
                 similarity_params: str | None = None, max_tokens: int = 2048):
        self.every_n_steps, self.split, self.num_examples, self.types = every_n_steps, split, num_examples, types
        self.sgd_form, self.similarity, self.similarity_params = sgd_form, similarity, similarity_params
        self.max_tokens = max_tokens
        self._pending: dict[str, Any] | None = None

    # ---- hooks -------------------------------------------------------------------------------------------------------
    def check_strategy(self, trainer: Trainer) -> None:
        """Refuse FSDP (InputError): the callback reads and perturbs the whole parameter vector on rank 0 alone (θ_s,
        the update, forward-mode passes through ``policy``), while under FSDP each rank holds a shard and every
        forward of a wrapped layer is a collective the other ranks would not join. ``dynlab`` calls it before the
        run directory is written (through the module's ``check_strategy``); :meth:`setup` again."""
        if "FSDP" in type(trainer.strategy).__name__:
            raise InputError("DynamicsCallback under FSDP is not supported: it works on rank 0 with the whole "
                             "parameter vector; train with DDP or on one device (it works there), or drop the "
                             "callback from trainer.callbacks", field="trainer.strategy")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_strategy(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None and trainer.is_global_zero and self._due(trainer, pl_module):
            self._capture(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        pending = self._pending
        if pending is None or not self.sgd_form or "sgd_update" in pending:
            return
        start = time.perf_counter()
        lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        # −η ∇θ L_u: the SGD update this gradient would make (before clipping, as the SGD form assumes)
        params = pl_module.policy.named_parameters()
        pending["sgd_update"] = {n: -lr.get(id(p), 0.0) * p.grad.detach() for n, p in params
                                 if p.requires_grad and p.grad is not None}
        pending["seconds"] += time.perf_counter() - start

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._pending is not None and trainer.global_step > self._pending["step"]:
            self._finish(trainer, pl_module)

    # ---- work --------------------------------------------------------------------------------------------------------
    def _due(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        every = self.every_n_steps or getattr(pl_module.hparams, "probe_every_n_steps", 0)
        step = trainer.global_step
        return bool(every) and step % every == 0 and step < trainer.estimated_stepping_batches

    def _observations(self, trainer: Trainer) -> list[tuple[str, int, list[int], list[int]]]:
        """(type, row, prompt ids, response ids) of the observed subset."""
        datamodule = trainer.datamodule
        if self.split not in datamodule.probe_examples:
            raise ValueError(f"DynamicsCallback: no probe split {self.split!r}, have {list(datamodule.probe_examples)}")
        types = self.types or datamodule.probe_types[self.split]
        return [(t, ex["index"], list(ex["prompt_ids"]), list(ex["responses"][t]))
                for ex in datamodule.probe_examples[self.split][: self.num_examples] for t in types
                if t in ex["responses"]]

    def _batches(self, observations: list, device: torch.device) -> list[dict[str, Tensor]]:
        batches, current, tokens = [], [], 0
        for obs in observations:
            n = len(obs[2]) + len(obs[3])
            if current and tokens + n > self.max_tokens:
                batches.append(current)
                current, tokens = [], 0
            current.append(obs)
            tokens += n
        if current:
            batches.append(current)
        return [pack([(o[2], o[3]) for o in chunk], device=device) for chunk in batches]

    def _capture(self, trainer: Trainer, pl_module: LightningModule) -> None:
        start = time.perf_counter()
        model = pl_module.policy
        observations = self._observations(trainer)
        batches = self._batches(observations, pl_module.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            before = torch.cat([sequence_logps(model, b) for b in batches])
        similarity_start = time.perf_counter()
        similarity = self._similarity(model, trainer) if self.similarity else None
        similarity_seconds = time.perf_counter() - similarity_start
        model.train(was_training)
        self._pending = {"step": trainer.global_step, "observations": observations, "batches": batches,
                         "before": before, "similarity": similarity, "similarity_seconds": similarity_seconds,
                         "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
        self._pending["seconds"] = time.perf_counter() - start

    def _similarity(self, model: torch.nn.Module, trainer: Trainer) -> dict[str, Any]:
        examples = trainer.datamodule.probe_examples[self.split][: self.num_examples]
        types = self.types or trainer.datamodule.probe_types[self.split]
        matrices = []
        for ex in examples:
            responses = {t: ex["responses"][t] for t in types if t in ex["responses"]}
            names, cosine = gradient_similarity(model, ex["prompt_ids"], responses, params=self.similarity_params)
            full = torch.full((len(types), len(types)), float("nan"))
            at = [types.index(n) for n in names]
            full[torch.tensor(at)[:, None], torch.tensor(at)[None, :]] = cosine.cpu()
            matrices.append(full)
        stacked = torch.stack(matrices)
        return {"types": list(types), "rows": [ex["index"] for ex in examples],
                "matrix": torch.nanmean(stacked, dim=0).tolist(), "per_row": stacked.tolist(),
                "params": self.similarity_params}

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending, self._pending = self._pending, None
        start = time.perf_counter()
        model = pl_module.policy
        was_training = model.training
        model.eval()
        before_params = pending["params"]
        delta = {n: p.detach() - before_params[n] for n, p in model.named_parameters() if n in before_params}
        with torch.no_grad():
            after = torch.cat([sequence_logps(model, b) for b in pending["batches"]])
        predicted = torch.cat([directional_change(model, b, delta, at=before_params) for b in pending["batches"]])
        values = {"observed": after - pending["before"], "predicted": predicted}
        if "sgd_update" in pending:
            values["predicted_sgd"] = torch.cat([directional_change(model, b, pending["sgd_update"], at=before_params)
                                                 for b in pending["batches"]])
        model.train(was_training)
        del pending["params"], delta
        pending.pop("sgd_update", None)
        seconds = pending["seconds"] + time.perf_counter() - start
        self._log(trainer, pl_module, pending, {k: v.detach().double().cpu() for k, v in values.items()}, seconds)

    def _log(self, trainer: Trainer, pl_module: LightningModule, pending: dict, values: dict[str, Tensor],
             seconds: float) -> None:
        step, split = pending["step"], self.split
        types = [o[0] for o in pending["observations"]]
        observed, predicted = values["observed"], values["predicted"]
        rel = (predicted - observed).abs() / observed.abs()
        metrics: dict[str, float] = {"dynamics/seconds": seconds,
                                     "dynamics/seconds_similarity": pending["similarity_seconds"],
                                     f"dynamics/{split}/median_rel_error": rel.median().item()}
        if observed.numel() > 1:
            metrics[f"dynamics/{split}/corr"] = torch.corrcoef(torch.stack([predicted, observed]))[0, 1].item()
        for t in dict.fromkeys(types):
            mask = torch.tensor([x == t for x in types])
            for name, v in values.items():
                metrics[f"dynamics/{split}/{name}/{t}"] = v[mask].mean().item()
            metrics[f"dynamics/{split}/rel_error/{t}"] = rel[mask].median().item()
        for logger in pl_module.loggers:
            logger.log_metrics(metrics, step=step)
        run_dir = pl_module.run_dir
        records = [{"split": split, "type": t, "row": row, **{f"dyn_{k}": v[i].item() for k, v in values.items()}}
                   for i, (t, row, _, _) in enumerate(pending["observations"])]
        add_step_columns(run_dir, step, records)
        if pending["similarity"] is not None:
            _write_json(Path(run_dir) / DYNAMICS_DIR / f"similarity_step_{step:08d}.json",
                        {"step": step, "split": split, **pending["similarity"]})


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)
