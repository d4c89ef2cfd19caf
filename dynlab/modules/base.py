"""CausalLMModule: the one shallow base of the SFT, ExtendSFT and DPO modules. It owns model construction, optimizer
injection, probe evaluation (at step 0 and every N steps), logging and the final HF export."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from dynlab.dynamics.influence import gradient_entanglement, trainable_params
from dynlab.errors import InputError
from dynlab.losses.logps import segment_sum, token_logps
from dynlab.metrics.displacement import (
    ENTANGLEMENT_STATS,
    PAIR_STATS,
    EntanglementMetric,
    ches,
    pair_edit_stats,
    pair_hidden_sums,
    rate_ratio,
)
from dynlab.metrics.functional import SEQUENCE_METRICS, ANormReduction, sequence_stats, token_stats
from dynlab.metrics.probe import DisplacementMetric, PreferenceMetric, ProbeTypeMetric
from dynlab.models.adapter import AdapterSpec, apply_adapter, as_adapter_spec, merged_state_dict
from dynlab.models.forward import (
    backbone_forward_count,
    dummy_backbone_forward,
    lm_head,
    response_hidden,
    shared_prompt_hidden_rows,
)
from dynlab.models.generate import generate_responses
from dynlab.models.load import ModelSpec, load_model, load_tokenizer
from dynlab.tracking.plots import plot_runs
from dynlab.tracking.trajectory import records_from_results, write_probe_set, write_step, write_tokens


def gather_objects(items: list) -> list:
    """Concatenate a picklable list over all ranks (the list itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


PROBE_PROGRESS_AFTER_S = 10.0  # a probe evaluation that ends sooner prints no progress


class ProbeProgress:
    """Progress of one probe evaluation as whole lines on stderr, readable on a terminal and in a Slurm log alike (no
    carriage returns): nothing while the evaluation is younger than ``after_s`` seconds, then one line each time a
    split passes another tenth of its batches, and at its last batch. Silent where ``enabled`` is False (rank > 0)."""

    def __init__(self, step: int, enabled: bool, after_s: float | None = None):
        self.step, self.enabled = step, enabled
        self.after_s = PROBE_PROGRESS_AFTER_S if after_s is None else after_s
        self.start = time.monotonic()
        self.split, self.total, self._shown = "", 0, -1

    def begin(self, split: str, total: int) -> None:
        self.split, self.total, self._shown = split, total, -1

    def update(self, done: int) -> None:
        elapsed = time.monotonic() - self.start
        tenth = done * 10 // max(self.total, 1)
        if not self.enabled or elapsed < self.after_s or tenth <= self._shown:
            return
        self._shown = tenth
        print(f"dynlab: probe evaluation at step {self.step}: probe_{self.split} {done}/{self.total} batches, "
              f"{elapsed:.0f} s elapsed", file=sys.stderr, flush=True)


class PairScoringProgress:
    """Progress of scoring training pairs (``CausalLMModule.score_pairs``), as ``ProbeProgress``: whole lines on
    stderr, one each time another tenth of the pairs is done, once scoring runs longer than ``after_s`` seconds."""

    def __init__(self, what: str, enabled: bool = True, after_s: float | None = None):
        self.what, self.enabled = what, enabled
        self.after_s = PROBE_PROGRESS_AFTER_S if after_s is None else after_s
        self.start, self._shown = time.monotonic(), -1

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.monotonic() - self.start
        tenth = done * 10 // max(total, 1)
        if not self.enabled or elapsed < self.after_s or tenth <= self._shown:
            return
        self._shown = tenth
        print(f"dynlab: {self.what}: {done}/{total} pairs, {elapsed:.0f} s elapsed", file=sys.stderr, flush=True)


def _plain(name: str, value: Tensor) -> float | int:
    """A per-pair statistic as a Python number: the counts (edit distance, first differing position) as ints."""
    return int(value.item()) if name in ("edit_distance", "first_diff") else value.item()


def uses_fsdp(trainer: L.Trainer | None) -> bool:
    """Whether the trainer shards the policy with FSDP (its weights are gathered per forward call)."""
    return trainer is not None and "FSDP" in type(trainer.strategy).__name__


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (the paper trains without dropout; the reference must be deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)
    return model


class CausalLMModule(L.LightningModule):
    """Shared machinery; subclasses define ``training_view`` and ``training_step``.

    Args:
        policy: where the policy's weights and tokenizer come from.
        init_from: start from an earlier run: its ``.ckpt`` or its ``export`` directory (ExtendSFT -> DPO).
        optimizer: optimizer class and arguments (default AdamW, lr 1e-5).
        scheduler: learning-rate scheduler; stepped every optimizer step.
        probe_every_n_steps: probe evaluation cadence in optimizer steps (also at step 0 and the last step);
            0 turns probe evaluation off during fit.
        probe_chunk_tokens: response tokens per vocabulary-projection chunk during probe evaluation (bounds memory).
        logp_chunk_tokens: the same for training log-probs (None = one chunk).
        dropout: keep the model's dropout (default off, as in the paper).
        a_norm: the probe metric ``a_norm``: ``token_mean`` (the mean of the per-token ||I - 1 pi_m^T||_F) or
            ``paper`` (the original code's A_o, sqrt(V (mean_m ||pi_m||)^2 + V - 2), to compare with its figures).
        adapter: train a LoRA adapter (peft) instead of the full weights (configs/lora.yaml); the export is then
            both RUN_DIR/export (merged weights, a plain model) and RUN_DIR/adapter (the adapter alone).
        activation_checkpointing: recompute each decoder layer's activations in backward instead of storing them
            (HF gradient checkpointing, non-reentrant): the same loss and gradients for about a third more compute
            and far less activation memory (``dynlab.models.memory``). It applies in training mode only, so probe
            evaluation and the reference keep their KV caches. Under FSDP prefer the strategy's own
            ``activation_checkpointing_policy`` (configs/strategies/fsdp.yaml sets it); both would checkpoint twice.
        probe_token_examples: K: for the first K probe rows of each split (by row index) every evaluation also keeps
            each response's per-token log-probs, their change since step 0 and (DPO) the per-token implicit reward, in
            RUN_DIR/tokens/step_XXXXXXXX.parquet (``dynlab.tracking.trajectory.read_tokens``); 0 turns it off.
        probe_entanglement_pairs: K: for the first K probe pairs of each split (by probe row index) every evaluation
            also computes their gradient entanglement (Yuan et al. 2024; ``dynlab.dynamics.influence``): <g+, g->,
            ||g+||^2, ||g-||^2 and their cosine, g = grad_theta log pi(y | x), two forward/backward passes per pair;
            per pair in the trajectory (``grad_*`` columns of the chosen rows), their means logged as
            ``probe/{split}/entanglement/{dot,sq_chosen,sq_rejected,cosine}``; 0 (default) turns it off.
        probe_entanglement_params: a regex over parameter names (``re.search``) restricting those gradients to the
            trainable parameters it matches (e.g. ``layers\\.(2[6-9])\\.``: SmolLM2's last 4 blocks); None = every
            trainable parameter (with a LoRA adapter, the adapter's).
    """

    training_view: ClassVar[str] = "sft"

    def __init__(
        self,
        policy: ModelSpec | None = None,
        init_from: str | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        probe_every_n_steps: int = 10,
        probe_chunk_tokens: int = 1024,
        logp_chunk_tokens: int | None = None,
        dropout: bool = False,
        a_norm: ANormReduction = "token_mean",
        adapter: AdapterSpec | None = None,
        activation_checkpointing: bool = False,
        probe_token_examples: int = 2,
        probe_entanglement_pairs: int = 0,
        probe_entanglement_params: str | None = None,
    ):
        super().__init__()
        # refused here, before any weights load: jsonargparse builds the module before the run directory exists
        for name, value, least in (("probe_every_n_steps", probe_every_n_steps, 0),
                                   ("probe_chunk_tokens", probe_chunk_tokens, 1),
                                   ("logp_chunk_tokens", logp_chunk_tokens, 1),
                                   ("probe_token_examples", probe_token_examples, 0)):
            if value is not None and value < least:
                hint = {"probe_every_n_steps": " (0 turns probe evaluation off)",
                        "probe_token_examples": " (0 keeps no per-token views)"}.get(name, "")
                raise InputError(f"must be at least {least}, got {value}{hint}", field=f"model.{name}")
        if probe_entanglement_pairs < 0:
            raise InputError(f"must be at least 0, got {probe_entanglement_pairs} (0 turns gradient entanglement off)",
                             field="model.probe_entanglement_pairs")
        if probe_entanglement_params is not None:
            try:
                re.compile(probe_entanglement_params)
            except re.error as err:
                raise InputError(f"{probe_entanglement_params!r} is not a regular expression: {err}",
                                 field="model.probe_entanglement_params") from None
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.spec = policy or ModelSpec()
        self.tokenizer = load_tokenizer(self.spec)
        self.policy = load_model(self.spec, init_from).train()  # from_pretrained returns eval mode
        if not dropout:
            disable_dropout(self.policy)
        # with an adapter, self.policy is the plain model with the LoRA layers injected (forward.py, probes, metrics
        # and dynamics see a HF model whose trainable parameters are the adapter's); the PeftModel around it, for
        # save_pretrained and disable_adapter, stays out of the module tree (its state would be checkpointed twice)
        self._peft: list[Any] = []
        self.adapter_spec = adapter = as_adapter_spec(adapter)
        if adapter is not None:
            self.policy.requires_grad_(False)
            base_name = str(Path(init_from).resolve()) if init_from is not None else self.spec.name_or_path
            self._peft.append(apply_adapter(self.policy, adapter, base_name=base_name))
            self.policy = self._peft[0].get_base_model()
        if activation_checkpointing:
            # transformers 5 calls it activation_checkpointing_enable (gradient_checkpointing_enable is deprecated)
            enable = getattr(self.policy, "activation_checkpointing_enable", None)
            (enable or self.policy.gradient_checkpointing_enable)({"use_reentrant": False})
            if adapter is not None and not getattr(self.policy, "_require_grads_hooks", None):
                # the frozen embeddings' output must require grad for peft's checkpointed layers (transformers 5
                # hooks it already; 4.x does only for adapters it loaded itself)
                self.policy.enable_input_require_grads()
        if probe_entanglement_params is not None:  # against the trainable parameters: the adapter's with LoRA
            try:
                trainable_params(self.policy, probe_entanglement_params)
            except ValueError:
                example = next((n for n, p in self.policy.named_parameters() if p.requires_grad), None)
                raise InputError(f"{probe_entanglement_params!r} matches no trainable parameter of the policy (names "
                                 f"as policy.named_parameters() gives them, e.g. {example!r})",
                                 field="model.probe_entanglement_params") from None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.probe_metrics = nn.ModuleDict()
        self.preference_metrics = nn.ModuleDict()
        self.probe_types: dict[str, list[str]] = {}
        self._baseline: dict[str, Tensor] = {}  # split -> (rows, types) logp at step 0, NaN where unknown
        # split -> (probe row, type) -> (L,) per-token logp at step 0, for the first probe_token_examples rows
        self._token_baseline: dict[str, dict[tuple[int, str], Tensor]] = {}
        self._last_probe_step = -1
        self._unlogged_row: dict | None = None  # carried by the checkpoint this run resumed from

    @property
    def peft_model(self) -> Any:
        """The ``PeftModel`` around ``policy`` (None without an adapter)."""
        return self._peft[0] if self._peft else None

    # ---- set-up ---------------------------------------------------------------------------------------------------
    def check_strategy(self, trainer: L.Trainer) -> None:
        """Refuse a strategy this module cannot run under (InputError). ``dynlab`` calls it before the run directory
        is written; :meth:`setup` again, for a Trainer built by hand."""
        if uses_fsdp(trainer) and self._peft:
            raise InputError("a LoRA adapter under FSDP is not supported yet: train it with DDP or on one device, or "
                             "drop model.init_args.adapter", field="trainer.strategy")
        # probe evaluation runs under FSDP (_fsdp_probe_split); what it cannot do there is refused
        if uses_fsdp(trainer) and self.hparams.get("probe_entanglement_pairs", 0):
            # its backward passes run for the first K pairs only, on the ranks that hold them: FSDP's gradient
            # reduce-scatters would wait on the other ranks
            raise InputError("gradient entanglement under FSDP is not supported yet: set it to 0, or train with DDP "
                             "or on one device", field="model.probe_entanglement_pairs")
        state = getattr(trainer, "state", None)
        if uses_fsdp(trainer) and getattr(state, "fn", None) in ("validate", "test"):
            # Lightning's evaluation loop runs each rank's shard of probe batches, a different number of FSDP
            # forwards per rank; fit's probe evaluation pads them (_fsdp_probe_split)
            raise InputError(f"dynlab {state.fn} under FSDP is not supported yet: score the run's export with DDP or "
                             "on one device (--model.init_args.init_from=RUN_DIR/export); probe evaluation during "
                             "fit does run under FSDP", field="trainer.strategy")
        for callback in getattr(trainer, "callbacks", None) or ():
            if hasattr(callback, "check_strategy"):  # e.g. DynamicsCallback under FSDP
                callback.check_strategy(trainer)

    def setup(self, stage: str) -> None:
        if stage == "fit":  # the clock of RUN_DIR/timing.json
            self._fit_start, self.probe_eval_seconds, self._export_seconds = time.monotonic(), 0.0, 0.0
        self.check_strategy(self.trainer)
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        self.init_probe_state(self.trainer.datamodule)

    def init_probe_state(self, datamodule: Any) -> None:
        """One metric per (split, probe type), one preference and one displacement metric per split, and empty step-0
        baselines and previous-evaluation log-probs."""
        self.probe_types = dict(datamodule.probe_types)
        self.pair_edit_cache.clear()  # keyed by probe row: this data module's rows may be others
        for split, types in self.probe_types.items():
            for t in types:
                self.probe_metrics[f"{split}__{t}"] = ProbeTypeMetric()
            self.preference_metrics[f"{split}__pairs"] = PreferenceMetric(beta=getattr(self.hparams, "beta", 0.1))
            self.preference_metrics[f"{split}__displacement"] = DisplacementMetric()
            if self.hparams.get("probe_entanglement_pairs", 0):
                self.preference_metrics[f"{split}__entanglement"] = EntanglementMetric()
            n = len(datamodule.probe_examples[split])
            self._baseline.setdefault(split, torch.full((n, len(types)), float("nan")))
            self._previous_logp.setdefault(split, torch.full((n, len(types)), float("nan")))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.AdamW(params, lr=1e-5)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                         "interval": "step"}}

    # ---- log-probs ------------------------------------------------------------------------------------------------
    def response_token_logps(self, batch: dict[str, Tensor], model: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """Log-probs of the response tokens: batch (B, T) -> (logps (N,), seq_index (N,))."""
        model = model or self.policy
        hidden, targets, seq_index = self.response_states(batch, model)
        return token_logps(lm_head(model, hidden), targets, chunk_size=self.hparams.logp_chunk_tokens), seq_index

    def response_states(self, batch: dict[str, Tensor], model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """The states that predict the response tokens: batch (B, T) -> (hidden (N, H), targets (N,), seq_index (N,)).

        One padded forward here; subclasses skip work (padding, a prompt repeated across rows) where the numbers
        allow, in any token order.
        """
        return response_hidden(model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def sequence_logps(self, batch: dict[str, Tensor], model: nn.Module | None = None) -> Tensor:
        """Summed response log-probs of each sequence: batch (B, T) -> (B,)."""
        logps, seq_index = self.response_token_logps(batch, model)
        return segment_sum(logps, seq_index, batch["input_ids"].shape[0])

    def generate(self, prompts: list[list[int]], **kwargs: Any) -> list[str]:
        """Responses of the current policy to prompts (token ids); see ``generate_responses``. A SIGTERM stops it
        between two generated tokens."""
        return generate_responses(self.policy, self.tokenizer, prompts, check=self.stop_if_asked, **kwargs)

    def stop_if_asked(self) -> None:
        """Raise Lightning's ``SIGTERMException`` if the trainer received SIGTERM.

        Lightning's handler only sets a flag, which its loops read between training batches; the long loops a step
        can run (probe evaluation, sampling, the export) call this between their own batches, so a SIGTERM stops
        the run within seconds wherever it lands. The checkpoints written so far are all complete: resume with
        ``--ckpt_path=last``. (SIGINT needs none of this: its KeyboardInterrupt is raised wherever it lands.)
        """
        trainer = self._trainer
        if trainer is None or not trainer.received_sigterm:
            return
        loop = trainer.fit_loop.epoch_loop
        progress = loop.batch_progress.current
        if trainer.training and progress.processed > progress.completed:
            # inside a trained batch's end hooks, where Lightning runs the checkpoint callbacks last: one due at this
            # step (not yet written when a callback such as GenerationMetrics stops here) is written first
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    callback.on_train_batch_end(trainer, self, None, None, loop.batch_idx)
        raise SIGTERMException

    # ---- probe evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def probe_step(self, split: str, batch: dict) -> dict[str, dict[str, Tensor]]:
        """Score every response of every probe row in ``batch`` and update the split's metrics.

        Returns per type the per-example values ``{metric: (rows,)}``, with ``row`` (probe row index).
        """
        per_type: dict[str, dict[str, list[Tensor]]] = defaultdict(lambda: defaultdict(list))
        index = batch["index"].tolist()
        vocab = self.policy.get_output_embeddings().weight.shape[0]  # V, for the paper's A_o
        # the batch's rows together: each prompt once, every row's responses grouped by length across rows (with
        # a whole batch to choose from, groups stay large at 10% padding)
        pair_sums: dict[tuple[int, str], Tensor] = {}  # (probe row, chosen|rejected) -> (H,) float64 sum of states
        per_token: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}  # (row < K, type) -> (token ids, logp), (L,)
        for members, hidden, targets, seq_index in shared_prompt_hidden_rows(self.policy, batch["prompt_ids"],
                                                                             batch["responses"], max_padding=0.1):
            stats = self._chunked_token_stats(hidden, targets)
            seq = sequence_stats(stats, seq_index, len(members), a_norm=self.hparams.get("a_norm", "token_mean"),
                                 vocab_size=vocab)
            if self._token_rows is not None:
                per_token.update(self._first_rows_tokens(members, index, targets, stats["logp"], seq_index))
            for j, (k, name) in enumerate(members):
                for m in SEQUENCE_METRICS:
                    per_type[name][m].append(seq[m][j : j + 1])
                per_type[name]["row"].append(torch.tensor([index[k]]))
            if self.probe_displacement:
                pair_sums.update(pair_hidden_sums(members, hidden, seq_index, index))
        results = {}
        for name, lists in per_type.items():
            order = torch.cat(lists["row"]).argsort()  # row order, so types line up row by row (chosen/rejected)
            values = {m: torch.cat(v)[order.to(v[0].device)] for m, v in lists.items()}
            rows, column = values["row"], self.probe_types[split].index(name)
            baseline = self._baseline[split]
            if self._recording_baseline:
                baseline[rows, column] = values["logp"].float().cpu()
            ref = baseline[rows, column].to(values["logp"])
            if not torch.isnan(ref).any():  # dlogp and rewards need the step-0 log-probs
                values["dlogp"], values["ref_logp"] = values["logp"] - ref, ref
            previous = self._previous_logp.get(split)
            if previous is not None and not torch.isnan(previous[rows, column]).any():
                values["dlogp_previous"] = values["logp"] - previous[rows, column].to(values["logp"])
            if self._current_logp is not None:  # this evaluation's log-probs: the next one's "previous"
                self._current_logp[split][rows, column] = values["logp"].float().cpu()
            self.probe_metrics[f"{split}__{name}"].update({m: values[m] for m in (*SEQUENCE_METRICS, "dlogp")
                                                           if m in values})
            results[name] = values
        if "chosen" in results and "rejected" in results:
            c, r = results["chosen"], results["rejected"]
            pairs = self.preference_metrics[f"{split}__pairs"]
            pairs.update(c["logp"], r["logp"], c.get("ref_logp"), r.get("ref_logp"))
            if self.probe_displacement:
                self._pair_diagnostics(split, batch, pair_sums, c, r)
            if self.hparams.get("probe_entanglement_pairs", 0):
                self._pair_entanglement(split, batch, c)
        for values in results.values():
            values.pop("dlogp_previous", None)
        if per_token:
            self._keep_token_views(split, batch, per_token)
        return results

    # ---- per-token views of the first probe_token_examples rows (RUN_DIR/tokens) ------------------------------------
    _token_rows: list[dict] | None = None  # the evaluation in progress's RUN_DIR/tokens rows (None: none kept)

    def _first_rows_tokens(self, members: list, index: list[int], targets: Tensor, logp: Tensor,
                           seq_index: Tensor) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """(probe row, type) -> (token ids (L,), per-token log pi (L,) float32), on the CPU, for the members of one
        response group whose probe row is below ``probe_token_examples``; tokens in response order."""
        k_rows = self.hparams.get("probe_token_examples", 0)
        return {(index[k], name): (targets[seq_index == j].cpu(), logp[seq_index == j].float().cpu())
                for j, (k, name) in enumerate(members) if index[k] < k_rows}

    def _keep_token_views(self, split: str, batch: dict,
                          per_token: dict[tuple[int, str], tuple[Tensor, Tensor]]) -> None:
        """One RUN_DIR/tokens row per (row, type) of ``per_token``: ``token_ids``, ``logp`` = log pi(y_t | x, y_<t),
        ``dlogp`` = logp - its step-0 value (recorded at the baseline evaluation, checkpointed; None where unknown)
        and, where ``probe_token_reference`` gives one, ``reward`` = beta (logp - log pi_ref(y_t | x, y_<t))."""
        baseline = self._token_baseline.setdefault(split, {})
        if self._recording_baseline:
            baseline.update({key: logp.clone() for key, (_, logp) in per_token.items()})
        reference = self.probe_token_reference(split, batch, sorted({row for row, _ in per_token}))
        for (row, name), (ids, logp) in per_token.items():
            start = baseline.get((row, name))
            known = start is not None and start.shape == logp.shape
            record = {"split": split, "row": row, "type": name, "step": self.global_step, "token_ids": ids.tolist(),
                      "logp": logp.tolist(), "dlogp": (logp - start).tolist() if known else None}
            if reference is not None:
                ref = reference.get((row, name))
                known = ref is not None and ref.shape == logp.shape
                record["reward"] = (self.hparams.beta * (logp - ref)).tolist() if known else None
            self._token_rows.append(record)

    def probe_token_reference(self, split: str, batch: dict, rows: list[int]) -> dict[tuple[int, str], Tensor] | None:
        """Per-token reference log-probs (probe row, type) -> (L,) of ``rows``' responses in ``batch``, for the
        per-token implicit reward; None: no reference, no reward (SFT)."""
        return None

    def _pair_diagnostics(self, split: str, batch: dict, pair_sums: dict[tuple[int, str], Tensor],
                          chosen: dict[str, Tensor], rejected: dict[str, Tensor]) -> None:
        """CHES, edit statistics and rate ratios of the batch's pairs: added to ``chosen`` as per-pair columns
        (``PAIR_STATS``, ``rate_ratio`` since step 0 and ``rate_ratio_step`` since the previous evaluation, each once
        known) and to the split's ``DisplacementMetric``.

        The rate ratio since the previous evaluation reads that evaluation's log-probs kept by the module
        (``_previous_logp``, checkpointed), not the trajectory store: the store is written by rank 0 only and may be
        absent (``dynlab validate``), while the kept values are on every rank and survive a resume.
        """
        rows = chosen["row"].tolist()
        position = {row: k for k, row in enumerate(batch["index"].tolist())}
        responses = [batch["responses"][position[row]] for row in rows]
        sums = [torch.stack([pair_sums[(row, t)] for row in rows]) for t in ("chosen", "rejected")]  # 2 x (B, H)
        lengths = [torch.tensor([r[t].numel() for r in responses]) for t in ("chosen", "rejected")]  # 2 x (B,)
        stats = dict(zip(("ches", "ches_norm"), ches(sums[0], sums[1], lengths[0], lengths[1])))
        cache = self.pair_edit_cache.setdefault(split, {})  # the token ids never change: edits computed once per pair
        missing = [row for row in rows if row not in cache]
        if missing:
            new = pair_edit_stats([batch["responses"][position[row]]["chosen"].tolist() for row in missing],
                                  [batch["responses"][position[row]]["rejected"].tolist() for row in missing])
            cache.update({row: {m: v[i] for m, v in new.items()} for i, row in enumerate(missing)})
        for m in PAIR_STATS[2:]:
            stats[m] = torch.stack([cache[row][m] for row in rows])
        device = chosen["logp"].device
        stats = {m: v.to(device) for m, v in stats.items()}
        deltas = {}
        for name, key in (("rate_ratio", "dlogp"), ("rate_ratio_step", "dlogp_previous")):
            if key in chosen and key in rejected:
                deltas[name] = (chosen[key], rejected[key])
                stats[name] = rate_ratio(rejected[key], chosen[key])
        self.preference_metrics[f"{split}__displacement"].update(
            {m: stats[m] for m in PAIR_STATS}, deltas.get("rate_ratio"), deltas.get("rate_ratio_step"))
        chosen.update(stats)

    def _pair_entanglement(self, split: str, batch: dict, chosen: dict[str, Tensor]) -> None:
        """Gradient entanglement of the batch's pairs among the first ``probe_entanglement_pairs`` probe rows: added to
        ``chosen`` as per-pair columns ``grad_{dot,sq_chosen,sq_rejected,cosine}`` (NaN for the other rows; absent
        from a batch without such a row) and to the split's ``EntanglementMetric``.

        Two forward/backward passes of the policy per pair, as it is (eval mode), with ``torch.autograd.grad``: no
        parameter's ``.grad`` is touched, so a step's accumulated gradients survive an evaluation inside it. The time
        it takes adds to ``probe_entanglement_seconds``, the pairs to ``probe_entanglement_count``.
        """
        limit, pattern = self.hparams.probe_entanglement_pairs, self.hparams.get("probe_entanglement_params")
        rows = chosen["row"].tolist()
        wanted = [i for i, row in enumerate(rows) if row < limit]
        if not wanted:
            return
        start = time.monotonic()
        position = {row: k for k, row in enumerate(batch["index"].tolist())}
        device = chosen["logp"].device
        columns = {m: torch.full((len(rows),), float("nan"), dtype=torch.float64, device=device)
                   for m in ENTANGLEMENT_STATS}
        for i in wanted:
            k = position[rows[i]]
            responses = batch["responses"][k]
            # no memory guard: the opt-in costs two float32 gradients of the selected parameters, less than the
            # gradients and optimizer state training holds already
            values = gradient_entanglement(self.policy, batch["prompt_ids"][k].tolist(), responses["chosen"].tolist(),
                                           responses["rejected"].tolist(), params=pattern, max_bytes=sys.maxsize)
            for m in ENTANGLEMENT_STATS:
                columns[m][i] = values[m].to(device)
        self.preference_metrics[f"{split}__entanglement"].update({m: v[wanted] for m, v in columns.items()})
        chosen.update({f"grad_{m}": v for m, v in columns.items()})
        self.probe_entanglement_seconds += time.monotonic() - start
        self.probe_entanglement_count += len(wanted)

    @torch.no_grad()
    def score_pairs(self, pairs: Sequence[dict], batch_size: int = 8,
                    progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """CHES, normalised CHES and the edit statistics of preference pairs under the current policy, with the probe
        evaluation's hidden-state forward (each prompt once, no vocabulary projection), in eval mode, without grad.

        Args:
            pairs: ``{"index", "prompt_ids", "responses": {"chosen": ids, "rejected": ids}}`` (the data module's
                ``training_pairs``).
            batch_size: pairs per forward.
            progress: called as ``progress(done, total)`` after each batch; default: a ``PairScoringProgress`` on
                rank 0.

        Returns:
            One dict per pair, in order: ``index``, every name of ``PAIR_STATS``, ``chosen_len``, ``rejected_len``.
            A policy on the CPU is scored on the GPU when one is there (``LOCAL_RANK``'s), and moved back.
        """
        if batch_size < 1:
            raise InputError(f"must be at least 1, got {batch_size}", field="batch_size")
        if progress is None:
            progress = PairScoringProgress("scoring pairs under the initial policy", enabled=rank_zero_only.rank == 0)
        device = self.policy.device
        if device.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        home, was_training = self.policy.device, self.policy.training
        self.policy.to(device).eval()
        out: list[dict] = []
        try:
            for start in range(0, len(pairs), batch_size):
                self.stop_if_asked()
                batch = pairs[start : start + batch_size]
                prompts = [torch.tensor(p["prompt_ids"], device=device) for p in batch]
                responses = [{t: torch.tensor(p["responses"][t], device=device) for t in ("chosen", "rejected")}
                             for p in batch]
                sums: dict[tuple[int, str], Tensor] = {}
                for members, hidden, _, seq_index in shared_prompt_hidden_rows(self.policy, prompts, responses,
                                                                               max_padding=0.1):
                    sums.update(pair_hidden_sums(members, hidden, seq_index, range(len(batch))))
                lengths = {t: torch.tensor([len(p["responses"][t]) for p in batch]) for t in ("chosen", "rejected")}
                scores = dict(zip(("ches", "ches_norm"), ches(
                    torch.stack([sums[(k, "chosen")] for k in range(len(batch))]).cpu(),
                    torch.stack([sums[(k, "rejected")] for k in range(len(batch))]).cpu(),
                    lengths["chosen"], lengths["rejected"])))
                scores.update(pair_edit_stats([p["responses"]["chosen"] for p in batch],
                                              [p["responses"]["rejected"] for p in batch]))
                for k, p in enumerate(batch):
                    out.append({"index": p["index"], **{m: _plain(m, scores[m][k]) for m in PAIR_STATS},
                                "chosen_len": len(p["responses"]["chosen"]),
                                "rejected_len": len(p["responses"]["rejected"])})
                progress(len(out), len(pairs))
        finally:
            self.policy.to(home).train(was_training)
        return out

    def _chunked_token_stats(self, hidden: Tensor, targets: Tensor,
                             model: nn.Module | None = None) -> dict[str, Tensor]:
        # at most one (chunk, V) float32 tensor is live at a time
        chunks = [token_stats(lm_head(model or self.policy, h), y) for h, y in
                  zip(hidden.split(self.hparams.probe_chunk_tokens), targets.split(self.hparams.probe_chunk_tokens))]
        return {m: torch.cat([c[m] for c in chunks]) for m in chunks[0]}

    def compute_probe_metrics(self) -> dict[str, Tensor]:
        """Synced means over all ranks, keyed ``probe/{split}/{metric}/{type}``; resets the metrics.

        Every rank computes every metric (the sync is a collective), even one that saw no probe rows.
        """
        out: dict[str, Tensor] = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update``.*")
            for key, metric in self.probe_metrics.items():
                split, ptype = key.split("__")
                out.update({f"probe/{split}/{m}/{ptype}": v for m, v in metric.compute().items()})
                metric.reset()
            for key, metric in self.preference_metrics.items():
                split = key.split("__")[0]
                out.update({f"probe/{split}/{m}": v for m, v in metric.compute().items()})
                metric.reset()
        return out

    _recording_baseline = False
    probe_eval_seconds = 0.0  # wall time spent in run_probe_evaluation during this fit
    probe_entanglement_seconds = 0.0  # of which computing gradient entanglement (``_pair_entanglement``)
    probe_entanglement_count = 0  # the pairs it was computed for
    _current_logp: dict[str, Tensor] | None = None  # split -> (rows, types) logp of the evaluation in progress
    # CHES, edit statistics and rate ratios of the probe pairs in every probe evaluation (benchmarks/displacement.py
    # turns them off on an instance to measure what they cost)
    probe_displacement: ClassVar[bool] = True

    @property
    def _previous_logp(self) -> dict[str, Tensor]:
        """split -> (rows, types) logp at the previous completed probe evaluation (NaN where unknown)."""
        return self.__dict__.setdefault("_previous_logp_state", {})

    @property
    def pair_edit_cache(self) -> dict[str, dict[int, dict[str, Tensor]]]:
        """split -> probe row -> its pair's edit statistics, computed at the first evaluation (they depend on the
        token ids alone); ``clear()`` it to compute them again."""
        return self.__dict__.setdefault("_pair_edit_cache", {})

    def run_probe_evaluation(self) -> None:
        """Evaluate every probe split now (all ranks take part), log the means at the current step and write the
        per-example values to the run's trajectory (rank 0, all ranks' rows gathered). Rank 0 prints its progress
        once the evaluation runs longer than ``PROBE_PROGRESS_AFTER_S``; the time it takes adds to
        ``probe_eval_seconds``."""
        start = time.monotonic()
        try:
            self._run_probe_evaluation(ProbeProgress(self.global_step, self.trainer.is_global_zero))
        finally:
            self.probe_eval_seconds += time.monotonic() - start

    def _run_probe_evaluation(self, progress: ProbeProgress) -> None:
        datamodule = self.trainer.datamodule
        was_training = self.policy.training
        self.policy.eval()
        self._recording_baseline = bool(self._baseline) and all(torch.isnan(b).all() for b in self._baseline.values())
        self._current_logp = {split: torch.full_like(b, float("nan")) for split, b in self._baseline.items()}
        self._token_rows = [] if self.hparams.get("probe_token_examples", 0) else None
        records: list[dict] = []
        try:
            for split in self.probe_types:
                loader = datamodule.probe_dataloader(split)
                if uses_fsdp(self.trainer):
                    records += self._fsdp_probe_split(split, loader, progress)
                    continue
                progress.begin(split, len(loader))
                for done, batch in enumerate(loader, 1):
                    self.stop_if_asked()  # stopped here, the evaluation leaves nothing behind: it is redone on resume
                    results = self.probe_step(split, move_data_to_device(batch, self.device))
                    records += records_from_results(split, {t: {m: v.tolist() for m, v in values.items()}
                                                            for t, values in results.items()})
                    progress.update(done)
        except BaseException:
            if self._recording_baseline:  # a half-recorded baseline is no baseline
                for b in self._baseline.values():
                    b.fill_(float("nan"))
                self._token_baseline.clear()
                self._recording_baseline = False
            self._current_logp = None  # the previous evaluation stays the previous one
            self._token_rows = None
            for metric in (*self.probe_metrics.values(), *self.preference_metrics.values()):
                metric.reset()
            self.policy.train(was_training)
            raise
        if self._recording_baseline:  # each rank saw its shard: combine, NaN where a rank had nothing
            for split, b in self._baseline.items():
                self._baseline[split] = self._combine_ranks(b)
            local = [(split, key, v) for split, b in self._token_baseline.items() for key, v in b.items()]
            for split, key, v in gather_objects(local):  # every rank gets the whole per-token baseline
                self._token_baseline.setdefault(split, {})[key] = v
            self._recording_baseline = False
            if self.trainer.is_global_zero:
                for split, rows in datamodule.probe_rows.items():
                    write_probe_set(self.run_dir, split, rows)
        current, self._current_logp = self._current_logp, None
        self._previous_logp.update({split: self._combine_ranks(b) for split, b in current.items()})
        self.policy.train(was_training)
        self._last_probe_step = self.global_step
        records = gather_objects(records)
        if self.trainer.is_global_zero:
            write_step(self.run_dir, self.global_step, records)
        token_rows, self._token_rows = self._token_rows, None
        if token_rows is not None:  # probe_token_examples > 0: the same on every rank
            token_rows = gather_objects(token_rows)
            if self.trainer.is_global_zero:
                decode = self.tokenizer.batch_decode
                for row in token_rows:
                    row["tokens"] = decode([[i] for i in row["token_ids"]], clean_up_tokenization_spaces=False)
                write_tokens(self.run_dir, self.global_step, token_rows)
        metrics = self.compute_probe_metrics()
        # logged at the number of optimizer steps taken (0 = before training), not Lightning's batch counter,
        # which lags by one inside on_train_batch_end
        for logger in self.loggers:
            logger.log_metrics({k: v.item() for k, v in metrics.items()}, step=self.global_step)
        self.trainer.callback_metrics.update(metrics)  # so checkpoint callbacks can monitor probe metrics

    def _fsdp_probe_split(self, split: str, loader: Any, progress: ProbeProgress) -> list[dict]:
        """Probe evaluation of one split under FSDP: the trajectory records of this rank's rows.

        FSDP keeps each rank's shard of the weights only: the root unit's (embeddings, final norm, ``lm_head``) are
        gathered in the root's forward, each wrapped decoder layer's in its own forward, and every gather is a
        collective. So each probe batch runs inside FSDP's root forward (Lightning's forward redirection, as its
        ``validation_step`` does), and every rank makes the same sequence of forwards: all ranks take as many batches
        as the rank with the most (a rank whose shard is shorter takes empty ones), and in each batch as many backbone
        forwards as the rank needing the most (``backbone_forward_count``: prompt groups plus response groups); a rank
        with fewer makes one-token dummy forwards whose results are dropped (``dummy_backbone_forward``). Each probe
        row is still scored once, by one rank, with the very forwards one process makes, so the numbers are one
        process's. A SIGTERM on any rank stops every rank at the same batch (the counts and the stop flag are one
        all-reduce per batch). Memory: one wrapped unit's full weights at a time, as in training.
        """
        strategy = self.trainer.strategy
        (total,) = self._max_over_ranks([len(loader)])
        progress.begin(split, total)
        batches, records = iter(loader), []
        for done in range(1, total + 1):
            batch = next(batches, None)
            count = 0
            if batch is not None:
                batch = move_data_to_device(batch, self.device)
                count = backbone_forward_count(self.policy, batch["prompt_ids"], batch["responses"],
                                               max_padding=0.1)  # as probe_step scores them
            stop, forwards = self._max_over_ranks([int(self.trainer.received_sigterm), count])
            if stop:  # stopped here, on every rank together (the due checkpoint is a collective under FSDP)
                self.trainer._signal_connector.received_sigterm = True
                self.stop_if_asked()
            with torch.no_grad():  # no backward hooks on the outputs
                results = strategy._forward_redirection(strategy.model, self, "_fsdp_probe_forward", split, batch,
                                                        forwards)
            records += records_from_results(split, {t: {m: v.tolist() for m, v in values.items()}
                                                    for t, values in results.items()})
            progress.update(done)
        return records

    def _fsdp_probe_forward(self, split: str, batch: dict | None, forwards: int) -> dict[str, dict[str, Tensor]]:
        """Inside FSDP's root forward: ``probe_step`` on ``batch`` (none: an empty batch), then dummy backbone
        forwards up to ``forwards`` in all (``_fsdp_probe_split``); returns ``probe_step``'s results ({} for none)."""
        calls = [0]
        hook = self.policy.base_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            results = self.probe_step(split, batch) if batch is not None else {}
        finally:
            hook.remove()
        if calls[0] > forwards:  # backbone_forward_count no longer describes probe_step
            raise RuntimeError(f"probe_step made {calls[0]} backbone forwards, {forwards} were planned")
        for _ in range(forwards - calls[0]):
            dummy_backbone_forward(self.policy, self.device)
        return results

    def _max_over_ranks(self, values: list[int]) -> list[int]:
        """Element-wise maximum of integers over all ranks (the values themselves when not distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return list(values)
        tensor = torch.tensor(values, dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor.tolist()

    def _combine_ranks(self, values: Tensor) -> Tensor:
        """Per-row values each rank filled for its shard (NaN elsewhere) -> the whole table on every rank (CPU)."""
        known = (~torch.isnan(values)).to(self.device, torch.float32)
        total = self.trainer.strategy.reduce(torch.nan_to_num(values).to(self.device), reduce_op="sum")
        count = self.trainer.strategy.reduce(known, reduce_op="sum")
        return torch.where(count > 0, total / count.clamp(min=1), float("nan")).cpu()

    def _probe_due(self) -> bool:
        every = self.hparams.probe_every_n_steps
        if not every or self._last_probe_step == self.global_step:
            return False
        return self.global_step % every == 0 or self.global_step >= self.trainer.estimated_stepping_batches

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # step 0, and a resumed run whose checkpoint was written before that step's evaluation
        if self._probe_due():
            self.run_probe_evaluation()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._probe_due():
            self.run_probe_evaluation()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.policy.eval()
        self.probe_step(list(self.probe_types)[dataloader_idx], batch)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.compute_probe_metrics(), sync_dist=False)

    on_test_epoch_end = on_validation_epoch_end

    # ---- checkpoints and export -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint saved during the step-0 evaluation (Lightning's Slurm SIGUSR1 handler saves wherever the signal
        # lands) has an incomplete baseline: save none, and the resumed run records it again
        recording = self._recording_baseline
        checkpoint["dynlab_probe_baseline"] = {split: torch.full_like(b, float("nan")) if recording else b.clone()
                                               for split, b in self._baseline.items()}
        checkpoint["dynlab_token_baseline"] = {} if recording else {
            split: {key: v.clone() for key, v in b.items()} for split, b in self._token_baseline.items()}
        checkpoint["dynlab_last_probe_step"] = self._last_probe_step
        # complete by construction: an evaluation in progress fills _current_logp, swapped in once it is done
        checkpoint["dynlab_probe_previous_logp"] = {split: b.clone() for split, b in self._previous_logp.items()}
        checkpoint["dynlab_unlogged_row"] = self._step_row_not_yet_logged()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._baseline.update(checkpoint.get("dynlab_probe_baseline", {}))
        for split, b in checkpoint.get("dynlab_token_baseline", {}).items():
            self._token_baseline.setdefault(split, {}).update(b)
        self._last_probe_step = checkpoint.get("dynlab_last_probe_step", -1)
        self._previous_logp.update(checkpoint.get("dynlab_probe_previous_logp", {}))
        self._unlogged_row = checkpoint.get("dynlab_unlogged_row")

    def on_train_start(self) -> None:
        self._train_started = True
        self._replay_unlogged_row()

    def _replay_unlogged_row(self) -> None:
        # a job killed between writing this checkpoint and logging the step it followed has no row for that step
        if self._unlogged_row is not None:
            for logger in self.loggers:
                if hasattr(logger, "log_replayed_row"):
                    logger.log_replayed_row(self._unlogged_row["metrics"], step=self._unlogged_row["step"])
            self._unlogged_row = None

    def _step_row_not_yet_logged(self) -> dict | None:
        """The logger row of the step just trained, when a checkpoint is written from ``on_train_batch_end``.

        Lightning logs a step's metrics only after every ``on_train_batch_end`` hook ran, so a ModelCheckpoint saving
        there is one row ahead of the loggers: the checkpoint carries that row for a resumed run to log.
        """
        trainer = self.trainer
        loop = trainer.fit_loop.epoch_loop
        progress = loop.batch_progress.current
        connector = trainer._logger_connector
        if (not trainer.training or progress.processed <= progress.completed or trainer.fit_loop._should_accumulate()
                or not (connector.should_update_logs or trainer.fast_dev_run)):
            return None
        metrics = {k: float(v) for k, v in connector.metrics["log"].items() if v.numel() == 1}
        if not metrics:
            return None
        return {"step": loop._batches_that_stepped, "metrics": {**metrics, "epoch": trainer.current_epoch}}

    @property
    def run_dir(self) -> Path:
        """Where this run's files go: the logger's versioned directory (resolved in ``setup`` on every rank, since
        ``trainer.log_dir`` is a collective under DDP)."""
        return self._run_dir

    _train_started = False
    _fit_start: float | None = None  # set in setup("fit"): the clock of RUN_DIR/timing.json
    _export_seconds = 0.0

    def on_fit_end(self) -> None:
        # a run resumed from a checkpoint of its last step has nothing left to train, and Lightning then skips
        # on_train_start and on_train_end: finish what the stopped run left undone (its last probe evaluation, row,
        # export and figures)
        if not self._train_started and self.trainer.global_step > 0:
            self._replay_unlogged_row()
            if self._probe_due():
                self.run_probe_evaluation()
            self.on_train_end()
        self._train_started = False
        if self.trainer.is_global_zero and self._fit_start is not None:
            self._write_timing()

    def _write_timing(self) -> None:
        """``RUN_DIR/timing.json``: this process's fit in wall seconds, ``total_s`` split into ``probe_eval_s`` (every
        probe evaluation), ``export_s`` (the HF export and the figures) and ``train_s`` (the rest: the steps, data,
        callbacks)."""
        total, probe, export = time.monotonic() - self._fit_start, self.probe_eval_seconds, self._export_seconds
        timing = {"train_s": total - probe - export, "probe_eval_s": probe, "export_s": export, "total_s": total}
        path = self.run_dir / "timing.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({k: round(v, 3) for k, v in timing.items()}, indent=1) + "\n")
        tmp.replace(path)

    def on_train_end(self) -> None:
        self.stop_if_asked()  # a SIGTERM during the last step: no export (a resumed run finishes it)
        start = time.monotonic()
        # every rank takes part in gathering the weights (sharded under FSDP); rank 0 writes
        state = self.trainer.strategy.lightning_module_state_dict() if not self._peft else {}
        if not self.trainer.is_global_zero:
            return
        self.stop_if_asked()
        if self._peft:  # no FSDP (check_strategy): the live weights are whole
            export_pretrained(self.policy, self.tokenizer, self.run_dir / "export",
                              state_dict=merged_state_dict(self.peft_model))
            self.stop_if_asked()
            # the base's embeddings are not resized by dynlab: no lookup of the base's config (offline) to check it
            export_pretrained(self.peft_model, self.tokenizer, self.run_dir / "adapter", save_embedding_layers=False)
        else:
            policy_state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
            export_pretrained(self.policy, self.tokenizer, self.run_dir / "export", state_dict=policy_state)
        if self._last_probe_step >= 0:
            self.stop_if_asked()
            figures = plot_runs([self.run_dir], self.run_dir / "figures")
            for logger in self.loggers:
                if hasattr(logger, "log_image"):  # W&B: the same figures as images on the run
                    for figure in figures:
                        logger.log_image(key=f"figures/{figure.stem}", images=[str(figure)])
        self._export_seconds += time.monotonic() - start


def export_pretrained(model: nn.Module, tokenizer: Any, out: Path, state_dict: dict | None = None,
                      **save_kwargs: Any) -> Path:
    """``save_pretrained`` model and tokenizer into ``out``, atomically (a crash leaves no half-written export)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".export-"))
    try:
        model.save_pretrained(tmp, state_dict=state_dict, **save_kwargs)
        tokenizer.save_pretrained(tmp)
    except BaseException:  # a Ctrl-C included: no half-written directory left behind either
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
