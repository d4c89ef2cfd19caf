"""DPOModule: preference learning — DPO (and cDPO, IPO, hinge, SLiC-HF, SPPO, DPOP, RPO) against a frozen reference
equal to the initial policy (with a LoRA adapter: the policy itself with the adapter disabled, so the base weights are
in memory once), or the reference-free SimPO (no reference at all); off-policy on the dataset's pairs, or SPIN-style
with the rejected response sampled from the current policy at every step (``negatives: policy``), or online: both
responses the best and worst of k policy samples as a ranker orders them (``pairs: policy_ranked``); the reference
optionally reset to the policy every N steps (``reference_update_every``). The sampling and ranking machinery is in
dynlab.modules.onpolicy.

    dynlab fit --config configs/dpo.yaml
    dynlab fit --config configs/spin.yaml
    dynlab fit --config configs/online_dpo.yaml
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from dynlab.errors import InputError
from dynlab.evaluation.judge import Judge, judge_from_spec
from dynlab.losses.dpo import REFERENCE_FREE, DPOArgumentError, LossType, check_dpo_args, dpo_loss
from dynlab.losses.logps import IGNORE_INDEX
from dynlab.models.forward import pair_rows, shared_prompt_hidden_rows, shares_kv_cache
from dynlab.models.generate import generate_token_ids
from dynlab.models.sampling import SamplingSpec, as_sampling_spec, prompt_ids_of, sample_seed
from dynlab.modules.base import CausalLMModule, disable_dropout, uses_fsdp
from dynlab.modules.onpolicy import (  # with_sampled_pairs, with_sampled_rejected, sample_stats: importable from here
    check_pairs_args,
    kept_mean,
    place_judge,
    rank_samples,
    ranked_rows,
    sample_stats,
    with_sampled_pairs,
    with_sampled_rejected,
    write_samples,
)

Negatives = Literal["dataset", "policy"]
Pairs = Literal["dataset", "policy_ranked"]


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
        negatives: where each pair's rejected response comes from: ``dataset`` (its rejected response) or ``policy``
            (SPIN-style: sampled from the current policy for the pair's prompt at every step; the chosen response
            stays the dataset's). Every sample is kept in RUN_DIR/samples/step_{step:08d}_rank{rank}.jsonl.
        pairs: where each pair's two responses come from: ``dataset`` (as ``negatives`` says) or ``policy_ranked``
            (online DPO: ``sampling.num_samples`` responses sampled from the current policy for the pair's prompt at
            every step, ordered by ``ranker``; the best becomes the chosen, the worst the rejected, and a prompt whose
            best and worst are tied is left out of the loss). Every sample, its score and the pick are kept in
            RUN_DIR/samples/step_{step:08d}_rank{rank}.jsonl; logs train/ranking/tie_fraction and score_margin.
        ranker: the judge that orders ``policy_ranked``'s samples, a ``dynlab judge`` spec: ``rm:PATH`` (a reward
            model: by score), ``hf:PATH`` (a local chat model's logit judge) or ``openai:BASE_URL@MODEL[#KEY_ENV]``
            (the last two: every pair in both orders, ranked by Copeland wins). Built once per process at fit start,
            never checkpointed.
        sampling: how ``negatives: policy`` and ``pairs: policy_ranked`` sample (temperature, top_p, max_new_tokens,
            seed, num_samples); a step's samples depend only on (seed, step, rank), so a resumed run samples what an
            uninterrupted one does.
        reference_update_every: every N optimizer steps the reference becomes the current policy (SPIN's
            iterations); 0 = never.
        **kwargs: see CausalLMModule.
    """

    training_view: ClassVar[str] = "dpo"

    def __init__(self, *args: Any, beta: float = 0.1, label_smoothing: float = 0.0,
                 loss_type: LossType = "sigmoid", precompute_ref_logps: bool = False, delta: float = 1.0,
                 nll_weight: float = 1.0, dpop_lambda: float = 50.0, gamma: float = 0.5,
                 negatives: Negatives = "dataset", pairs: Pairs = "dataset", ranker: str | None = None,
                 sampling: SamplingSpec | None = None, reference_update_every: int = 0, **kwargs: Any):
        # refused before the weights load (dpo_loss would only refuse them at the first training step)
        try:
            check_dpo_args(beta, label_smoothing, loss_type, delta=delta, nll_weight=nll_weight,
                           dpop_lambda=dpop_lambda, gamma=gamma)
        except DPOArgumentError as err:
            raise InputError(err.message, field=f"model.{err.argument}") from None
        if precompute_ref_logps and loss_type in REFERENCE_FREE:
            raise InputError(f"loss_type {loss_type!r} has no reference model whose log-probs could be precomputed: "
                             "drop precompute_ref_logps", field="model.precompute_ref_logps")
        if negatives not in ("dataset", "policy"):
            raise InputError(f"must be 'dataset' or 'policy', got {negatives!r}", field="model.negatives")
        check_pairs_args(pairs, ranker, negatives, precompute_ref_logps)
        sampling_spec = as_sampling_spec(sampling)
        if not isinstance(reference_update_every, int) or reference_update_every < 0:
            raise InputError(f"must be an integer >= 0 (0 = never), got {reference_update_every!r}",
                             field="model.reference_update_every")
        if precompute_ref_logps and negatives == "policy":
            raise InputError("negatives 'policy' samples responses that have no cached reference log-probs: drop "
                             "precompute_ref_logps", field="model.precompute_ref_logps")
        if precompute_ref_logps and reference_update_every:
            raise InputError("reference_update_every changes the reference during training, so its log-probs cannot "
                             "be cached: drop precompute_ref_logps", field="model.precompute_ref_logps")
        if reference_update_every and loss_type in REFERENCE_FREE:
            raise InputError(f"loss_type {loss_type!r} has no reference model to update: set it to 0",
                             field="model.reference_update_every")
        super().__init__(*args, **kwargs)
        if self.adapter_spec is not None and self.adapter_spec.bias != "none" and not precompute_ref_logps \
                and loss_type not in REFERENCE_FREE:
            # peft trains the base's own bias tensors, which disable_adapter() leaves in place: the reference would
            # move with the policy
            raise InputError(f"bias {self.adapter_spec.bias!r} trains the base's biases, so the base with the adapter "
                             "disabled is no longer the reference: use bias 'none', or precompute_ref_logps: true "
                             "(the reference's log-probs are then taken once, before training)",
                             field="model.adapter.bias")
        if reference_update_every and self.peft_model is not None:
            raise InputError("is not supported with an adapter yet (the reference is the base with the adapter "
                             "disabled): set it to 0 or drop model.init_args.adapter",
                             field="model.reference_update_every")
        self.negatives, self.sampling, self.reference_update_every = negatives, sampling_spec, reference_update_every
        self.pairs, self.ranker = pairs, ranker
        self._ranker_judge: Judge | None = None  # built at fit start (ranking_judge): not a module, not checkpointed
        self.reference_updates = 0  # times the reference became the policy (checkpointed)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        # kept out of the module tree: not trained, not in the state dict (it is rebuilt from the initial weights, or
        # from the checkpoint's dynlab_reference_state once reference_update_every updated it); with an adapter the
        # frozen base under the policy's LoRA layers is the reference (reference_sequence_logps)
        self.reference_free = loss_type in REFERENCE_FREE  # simpo: no reference is built, run or checkpointed
        no_copy = self.reference_free or self.peft_model is not None
        self._reference: list[nn.Module] = [] if no_copy else [frozen_copy(self.policy)]
        self.ref_logps: Tensor | None = None  # (pairs, 2) when precomputed

    @property
    def reference(self) -> nn.Module:
        return self._reference[0]

    def check_strategy(self, trainer: Any) -> None:
        super().check_strategy(trainer)
        sampled = ("negatives: policy" if self.negatives == "policy"
                   else "pairs: policy_ranked" if self.pairs == "policy_ranked" else None)
        if uses_fsdp(trainer) and (sampled or self.reference_update_every):
            # sampling calls the sharded policy outside FSDP's root forward, a different number of times per rank
            what = sampled or "reference_update_every"
            raise InputError(f"{what} under FSDP is not supported yet: train with DDP or on one device",
                             field="trainer.strategy")
        if sampled and trainer.accumulate_grad_batches > 1:
            # a step's samples are keyed by (seed, step, rank): the micro-batches of one step would share them
            raise InputError(f"{sampled} with gradient accumulation is not supported yet: raise "
                             "data.batch_size instead", field="trainer.accumulate_grad_batches")

    def update_reference(self) -> None:
        """The reference becomes the current policy (its weights copied in; still frozen, eval, no dropout)."""
        self.reference.load_state_dict(self.policy.state_dict())
        self.reference_updates += 1

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, after the step and before this step's checkpoint callbacks run: a checkpoint of step N holds the
        # reference updated at step N. Lightning counts the step in global_step only once this hook returns
        every = self.reference_update_every
        if every and (self.global_step + 1) % every == 0:
            self.update_reference()

    def sample_negatives(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[list[int]], int]:
        """The batch with each rejected row replaced by prompt + a response sampled from the current policy, the
        samples (token ids, EOS kept when generated) and their seed, ``sample_seed(sampling.seed, step, rank)``.
        batch (2B, T) -> batch (2B, T')."""
        prompts = prompt_ids_of(batch)
        spec = self.sampling
        seed = sample_seed(spec.seed, self.global_step, self.global_rank)
        samples = generate_token_ids(self.policy, self.tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                                     temperature=spec.temperature, top_p=spec.top_p, seed=seed,
                                     batch_size=len(prompts), check=self.stop_if_asked)
        return with_sampled_rejected(batch, prompts, samples, self.tokenizer.pad_token_id), samples, seed

    def keep_samples(self, batch: dict[str, Tensor], samples: list[list[int]], seed: int) -> None:
        """Write a step's samples to RUN_DIR/samples/step_{step:08d}_rank{rank}.jsonl (atomically; a re-run step
        replaces its file) and log their ``train/sample/*`` statistics."""
        decode = self.tokenizer.decode
        prompts = prompt_ids_of(batch)
        texts = [decode(s, skip_special_tokens=True) for s in samples]
        rows = [{"index": int(i), "prompt": decode(p, skip_special_tokens=True), "sample": text, "tokens": len(ids),
                 "sample_ids": ids, "seed": seed}
                for i, p, text, ids in zip(batch["index"].tolist(), prompts, texts, samples)]
        write_samples(self.run_dir, self.global_step, self.global_rank, rows)
        self.log_sample_stats(samples, texts)

    def log_sample_stats(self, samples: list[list[int]], texts: list[str]) -> None:
        stats = sample_stats(samples, texts, self.tokenizer.eos_token_id)
        self.log_dict({f"train/sample/{k}": v for k, v in stats.items()}, batch_size=len(samples), sync_dist=True)

    def ranking_judge(self) -> Judge:
        """The ranker (``judge_from_spec(ranker)``), built on first use, at fit start, once per process and on this
        module's device; kept out of the module tree, so never in the state dict or checkpoint."""
        if self._ranker_judge is None:
            try:
                judge = judge_from_spec(self.ranker)
            except InputError as err:
                raise InputError(err.message, file=err.file, field="model.ranker") from None
            place_judge(judge, self.device)
            self._ranker_judge = judge
        return self._ranker_judge

    def sample_ranked_pairs(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Each pair replaced by the best and the worst of k = ``sampling.num_samples`` responses sampled from the
        current policy for its prompt (one batched call over the k*B prompt copies, seed ``sample_seed(sampling.seed,
        step, rank)``), as the ranker orders them; the samples kept in RUN_DIR/samples/ and logged (train/sample/*
        over all k*B, train/ranking/*). batch (2B, T) -> (batch (2B, T'), keep (B,) bool: False where tied)."""
        prompts, spec, tok = prompt_ids_of(batch), self.sampling, self.tokenizer
        k, n = spec.num_samples, len(prompts)
        seed = sample_seed(spec.seed, self.global_step, self.global_rank)
        flat = generate_token_ids(self.policy, tok, [p for p in prompts for _ in range(k)],
                                  max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
                                  seed=seed, batch_size=k * n, check=self.stop_if_asked)  # prompt-major: (B*k)
        texts = [tok.decode(s, skip_special_tokens=True) for s in flat]
        samples = [flat[b * k : (b + 1) * k] for b in range(n)]
        grouped = [texts[b * k : (b + 1) * k] for b in range(n)]
        shown = [tok.decode(p, skip_special_tokens=True) for p in prompts]
        rankings, kind = rank_samples(self.ranking_judge(), shown, grouped, samples)
        rows = ranked_rows(batch["index"].tolist(), shown, grouped, samples, rankings, kind, seed)
        write_samples(self.run_dir, self.global_step, self.global_rank, rows)
        self.log_sample_stats(flat, texts)
        self.log_dict({"train/ranking/tie_fraction": sum(r.tied for r in rankings) / n,
                       "train/ranking/score_margin": sum(r.margin for r in rankings) / n}, batch_size=n, sync_dist=True)
        new = with_sampled_pairs(batch, prompts, [s[r.best] for s, r in zip(samples, rankings)],
                                 [s[r.worst] for s, r in zip(samples, rankings)], tok.pad_token_id)
        return new, torch.tensor([not r.tied for r in rankings], device=batch["input_ids"].device)

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

    @torch.no_grad()
    def probe_token_reference(self, split: str, batch: dict, rows: list[int]) -> dict[tuple[int, str], Tensor] | None:
        """Per-token log pi_ref of the responses of probe ``rows`` in ``batch``, (row, type) -> (L,) float32, for
        RUN_DIR/tokens' ``reward``: the reference model's own (with an adapter, the policy with the adapter disabled);
        once ``precompute_ref_logps`` freed the reference, the step-0 policy's, which is the reference then (the
        initial policy, or ``init_from``'s: cached reference log-probs exclude reference updates). None for simpo."""
        if self.reference_free:
            return None
        if not self._reference and self.peft_model is None:
            return self._token_baseline.get(split, {})
        model = self.reference if self._reference else self.policy
        position = {row: k for k, row in enumerate(batch["index"].tolist())}
        prompts = [batch["prompt_ids"][position[row]] for row in rows]
        responses = [batch["responses"][position[row]] for row in rows]
        out: dict[tuple[int, str], Tensor] = {}
        with contextlib.ExitStack() as stack:
            if not self._reference:
                stack.enter_context(self.peft_model.disable_adapter())
            for members, hidden, targets, seq_index in shared_prompt_hidden_rows(model, prompts, responses,
                                                                                 max_padding=0.1):
                logp = self._chunked_token_stats(hidden, targets, model)["logp"]  # as the policy's, for reward 0 at 0
                out.update({(rows[k], name): logp[seq_index == j].float().cpu() for j, (k, name) in enumerate(members)})
        return out

    def on_fit_start(self) -> None:
        if self.pairs == "policy_ranked":
            self.ranking_judge()
        if self.ref_logps is None and self._reference:
            # the policy's device and dtype (bf16-true converts the policy, not the reference outside the module
            # tree): at step 0 the two give bitwise the same log-probs
            self.reference.to(self.device, dtype=self._reference_dtype())
        if self.hparams.precompute_ref_logps and self.ref_logps is None:
            self.ref_logps = self._precompute_ref_logps()
        if self.ref_logps is not None:
            self.ref_logps = self.ref_logps.to(self.device)
            self._reference.clear()  # the cache replaces the model

    def _reference_dtype(self) -> torch.dtype:
        """The dtype the policy computes in, for the reference: its parameters' (bf16-true converts them), or under
        FSDP its mixed precision's ``param_dtype`` (bf16-mixed: bf16). FSDP casts the weights it gathers for the
        policy, not the reference: the reference is deliberately not sharded (it sits outside the module tree FSDP
        wraps, a whole copy on every device, ``memory_estimate(reference="live")``; ``precompute_ref_logps`` frees
        it after fit start), and in the policy's compute dtype it gives the step-0 policy's log-probs."""
        strategy = self._trainer.strategy if uses_fsdp(self._trainer) else None
        mixed = getattr(strategy, "mixed_precision_config", None)
        if mixed is not None and mixed.param_dtype is not None:
            return mixed.param_dtype
        return next(self.policy.parameters()).dtype

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
        if model.training and getattr(model, "is_activation_checkpointing", False):
            return super().response_states(batch, model)  # checkpointed layers drop the KV cache in training
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
        keep = None  # (B,) bool: the pairs in the loss (policy_ranked leaves ties out)
        if self.negatives == "policy":
            batch, samples, seed = self.sample_negatives(batch)
            self.keep_samples(batch, samples, seed)
        elif self.pairs == "policy_ranked":
            batch, keep = self.sample_ranked_pairs(batch)
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
        loss = losses.mean() if keep is None else kept_mean(losses, keep)
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
        if self.reference_update_every:
            self.log("train/reference_updates", float(self.reference_updates), batch_size=n)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ref_logps is not None:
            checkpoint["dynlab_ref_logps"] = self.ref_logps.cpu()
        if self.reference_updates:  # otherwise the reference is the initial policy, rebuilt on load
            checkpoint["dynlab_reference_state"] = {k: v.detach().cpu().clone()
                                                    for k, v in self.reference.state_dict().items()}
            checkpoint["dynlab_reference_updates"] = self.reference_updates

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "dynlab_ref_logps" in checkpoint:
            self.ref_logps = checkpoint["dynlab_ref_logps"].to(self.device)
        if "dynlab_reference_state" in checkpoint and self._reference:
            self.reference.load_state_dict(checkpoint["dynlab_reference_state"])
            self.reference_updates = checkpoint["dynlab_reference_updates"]
