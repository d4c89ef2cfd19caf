"""ProbeDataModule: one data module for SFT, ExtendSFT and DPO. It gives each module the training view it asks for
and the two probe splits (probe_train from training prompts, probe_test from held-out prompts)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from dynlab.chat import backend_from_spec, redact_spec
from dynlab.data.formats import load_rows
from dynlab.data.probes import build_probe_rows
from dynlab.data.rephrase import add_rephrases
from dynlab.data.synthetic import make_synthetic
from dynlab.data.tokenize import (
    DPOCollator,
    ResponseTruncation,
    SFTCollator,
    collate_probes,
    encode_row,
    keep_prompt_end,
)
from dynlab.errors import InputError
from dynlab.metrics.displacement import top_fraction
from dynlab.tracking.trajectory import write_jsonl

log = logging.getLogger(__name__)

TrainingView = Literal["sft", "extend", "dpo"]
PROBE_SPLITS = ("train", "test")


class ShardSampler(DistributedSampler):
    """Every ``num_replicas``-th index from ``rank``, in order and without the padding DistributedSampler adds, so
    summed metrics over ranks count each probe exactly once (Lightning leaves a DistributedSampler in place)."""

    def __init__(self, dataset: Sequence, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class ResumableSampler(DistributedSampler):
    """The training shuffle: a permutation seeded by ``seed + epoch`` (set by Lightning through ``set_epoch``),
    sharded over ranks, that skips the batches a resumed run already trained on in the epoch it resumes in, so a
    resumed run sees the same batches as one that never stopped.

    ``resume(steps, batch_size, accumulate)`` takes the optimizer steps already taken. Which epoch they leave off in
    and how much of it is done is decided when the sampler is iterated, from the epoch it is iterated for: a
    checkpoint written at an epoch's last batch resumes at the start of the next epoch, which Lightning sets only
    after it made this loader, so a skip fixed when the loader is made would skip that whole next epoch.
    """

    def __init__(self, dataset: Sequence, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int, int] | None = None  # (steps, batch_size, accumulate), used by one __iter__

    def resume(self, steps: int, batch_size: int, accumulate: int) -> None:
        self._resume = (steps, batch_size, accumulate)
        self.set_epoch(steps // self.steps_per_epoch(batch_size, accumulate))  # where Lightning resumes too; set
        # here as well for DataLoader workers, which draw indices before Lightning's set_epoch

    def steps_per_epoch(self, batch_size: int, accumulate: int) -> int:
        # Lightning also steps on an epoch's last, short group of batches
        return math.ceil(math.ceil(len(self) / batch_size) / accumulate)

    def skip(self) -> int:
        """Examples of this rank's shard the epoch being iterated already trained on (len() stays the full epoch's:
        Lightning takes it as the length of every epoch, and a short first epoch simply ends early)."""
        if self._resume is None:
            return 0
        steps, batch_size, accumulate = self._resume
        per_epoch = math.ceil(len(self) / batch_size)
        done = (steps - self.epoch * self.steps_per_epoch(batch_size, accumulate)) * accumulate
        return min(max(done, 0), per_epoch) * batch_size

    def __iter__(self):
        indices = list(super().__iter__())[self.skip():]
        self._resume = None
        return iter(indices)


class ResumableLoader(DataLoader):
    """The training loader. Its ``ResumableSampler`` resumes from the optimizer steps the checkpoint restores, so
    the loader has no state of its own to save; having ``state_dict`` says it is resumable (Lightning warns that
    a mid-epoch resume of a loader without one is unreliable)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class ProbeDataModule(L.LightningDataModule):
    """Preference data, its training views, and the probe sets.

    Args:
        source: ``synthetic`` (the embedded set), a local .jsonl/.json/.parquet file, or a hub dataset id.
        split: split of a hub dataset to train on.
        heldout_split: split that holds the held-out prompts (probe_test, irr_test); default: the rows after
            ``num_train`` of ``split``.
        config_name: hub dataset config name.
        data_dir: hub dataset ``data_dir`` (``helpful-base`` for HH).
        format: row format, or ``auto`` to detect it per row.
        num_train: training pairs (the first rows of ``split``; ``None`` = all).
        num_heldout: held-out rows to read.
        probe_size: prompts per probe split.
        probe_train_size: prompts of probe_train (``None`` = ``probe_size``).
        probe_test_size: prompts of probe_test (``None`` = ``probe_size``).
        probe_types: probe response types to score (``None`` = every type the data can give).
        probe_train_file: a probe jsonl in the paper's format used as probe_train instead of building one.
        probe_test_file: the same for probe_test (e.g. ``../shared/data/hh_probe/probe_test.jsonl``).
        rebuild_irr_train: ignore the ``irr_train`` responses the probe rows of either split carry (the paper's
            probe file has them, often from rows that are not trained on here) and build them from the training
            rows: the chosen response of another training row (for probe_test too: irr_train is a trained-on
            response on held-out prompts).
        sample_chosen_initial: add the ``chosen_initial`` probe type where the data lacks it: a response sampled
            (seeded by ``seed``) from the initial policy; the run's ``probes/probe_{split}.jsonl`` keeps the texts.
        chosen_initial_max_tokens: length limit of those samples.
        rephraser: build the rephrase types where the data lacks them with a chat backend: ``hf:PATH_OR_ID`` (a
            local chat model) or ``openai:BASE_URL@MODEL[#API_KEY_ENV]`` (an OpenAI-compatible endpoint).
        batch_size: training examples (DPO: pairs) per batch and device.
        probe_batch_size: probe prompts per evaluation batch.
        max_length: prompt + response tokens.
        max_prompt_length: the prompt is cut to its last ``max_prompt_length`` tokens when a row does not fit.
        response_truncation: ``error`` (default) or ``keep_start`` for responses that still do not fit.
        seed: seed of the synthetic data and of the probe construction.
        num_workers: DataLoader workers.
        drop_most_displacing: drop this fraction of the training pairs, those with the highest normalised CHES
            under the initial policy (Razin et al. 2024's filter against likelihood displacement), in [0, 1): before
            training and before the probe sets are built (probe_train's prompts and irr_train come from the kept
            pairs); rows without a rejected response are never dropped. The run logs the count and writes
            RUN_DIR/dropped_pairs.jsonl (source row index, prompt, scores).
    """

    def __init__(
        self,
        source: str = "synthetic",
        split: str = "train",
        heldout_split: str | None = None,
        config_name: str | None = None,
        data_dir: str | None = None,
        format: Literal["auto", "hh", "chat", "flat", "probe"] = "auto",
        num_train: int | None = 64,
        num_heldout: int = 32,
        probe_size: int = 16,
        probe_train_size: int | None = None,
        probe_test_size: int | None = None,
        probe_types: list[str] | None = None,
        probe_train_file: str | None = None,
        probe_test_file: str | None = None,
        rebuild_irr_train: bool = False,
        sample_chosen_initial: bool = False,
        chosen_initial_max_tokens: int = 48,
        rephraser: str | None = None,
        batch_size: int = 4,
        probe_batch_size: int = 4,
        max_length: int = 256,
        max_prompt_length: int = 128,
        response_truncation: ResponseTruncation = "error",
        seed: int = 0,
        num_workers: int = 0,
        drop_most_displacing: float = 0.0,
    ):
        super().__init__()
        # refused here, before anything is read or written (jsonargparse builds the data module before the run)
        for name, value, least in (("num_train", num_train, 1), ("num_heldout", num_heldout, 1),
                                   ("probe_size", probe_size, 1), ("probe_train_size", probe_train_size, 1),
                                   ("probe_test_size", probe_test_size, 1), ("batch_size", batch_size, 1),
                                   ("probe_batch_size", probe_batch_size, 1), ("max_length", max_length, 2),
                                   ("max_prompt_length", max_prompt_length, 1), ("num_workers", num_workers, 0),
                                   ("chosen_initial_max_tokens", chosen_initial_max_tokens, 1)):
            if value is not None and value < least:
                off = " (to turn probe evaluation off, set model.probe_every_n_steps=0)"
                hint = {"num_train": " (null reads every row)", "probe_size": off, "probe_train_size": off,
                        "probe_test_size": off}.get(name, "")
                raise InputError(f"must be at least {least}, got {value}{hint}", field=f"data.{name}")
        if not 0 <= drop_most_displacing < 1:
            raise InputError(f"must be in [0, 1) (a fraction of the training pairs), got {drop_most_displacing}",
                             field="data.drop_most_displacing")
        if max_prompt_length >= max_length:
            raise InputError(f"must be less than data.max_length ({max_length}), got {max_prompt_length}: a cut prompt "
                             "must leave room for the response", field="data.max_prompt_length")
        self.save_hyperparameters()
        self.hp = self.hparams
        # the spec as given (an endpoint URL may carry credentials); the logged hyperparameters keep it redacted
        self._rephraser = rephraser
        if rephraser:  # the live values and the copy Lightning logs (hparams_initial)
            self.hp.rephraser = self._hparams_initial.rephraser = redact_spec(rephraser)
        self._prepared_for: tuple | None = None
        self._heldout_origin: tuple[str, int] = (source, 0)
        self.train_examples: list[dict] = []
        self.probe_examples: dict[str, list[dict]] = {}
        self.probe_types: dict[str, list[str]] = {}
        self.probe_rows: dict[str, list[dict]] = {}  # the probe texts, in the paper's probe jsonl format
        self.dropped_pairs: list[dict] = []  # drop_most_displacing's pairs, highest normalised CHES first
        self._dropped_written = False

    # ---- building -------------------------------------------------------------------------------------------------
    def prepare(self, tokenizer, view: TrainingView, generate: Callable[..., list[str]] | None = None,
                score: Callable[[list[dict]], list[dict]] | None = None) -> None:
        """Read, validate and tokenize everything; raises InputError before any run file is written.

        ``generate(prompt_ids, max_new_tokens=, seed=)`` samples from the initial policy (for chosen_initial);
        ``score(pairs)`` scores ``training_pairs`` under it (``CausalLMModule.score_pairs``, for
        drop_most_displacing).
        """
        if self._prepared_for == (id(tokenizer), view):
            return
        train_rows, heldout_rows = self._read_rows(tokenizer, view)
        if self.hp.get("drop_most_displacing", 0.0) > 0:
            train_rows = self._drop_most_displacing(tokenizer, train_rows, score)
        pad = tokenizer.pad_token_id
        self._collate = DPOCollator(pad) if view == "dpo" else SFTCollator(pad)
        self.train_examples = self._training_view(tokenizer, train_rows, view)
        self.probe_rows = self.build_probe_sets(tokenizer, train_rows, heldout_rows, generate)
        for split, rows in self.probe_rows.items():
            file = {"train": self.hp.probe_train_file, "test": self.hp.probe_test_file}[split]
            # where an error should point: the probe file, or the rows' place in the source
            origin = (file, 0) if file else {"train": (self.hp.source, 0), "test": self._heldout_origin}[split]
            self.probe_types[split] = [t for t in rows[0] if t != "prompt"] if rows else []
            self.probe_examples[split] = [self._encode(tokenizer, r, i, *origin) for i, r in enumerate(rows)]
        self._prepared_for = (id(tokenizer), view)

    def training_pairs(self, tokenizer, rows: list[dict] | None = None) -> list[dict]:
        """The training rows that have a rejected response, tokenized as probe rows: ``{"index" (the row's place
        among the training rows), "prompt" (its text), "prompt_ids", "responses": {"chosen", "rejected"}}`` (what
        ``score`` takes)."""
        if rows is None:
            rows = self._read_rows(tokenizer)[0]
        return [{**self._encode(tokenizer, {k: r[k] for k in ("prompt", "chosen", "rejected")}, i, self.hp.source),
                 "prompt": r["prompt"]} for i, r in enumerate(rows) if isinstance(r.get("rejected"), str)]

    def _drop_most_displacing(self, tokenizer, rows: list[dict],
                              score: Callable[[list[dict]], list[dict]] | None) -> list[dict]:
        """``rows`` without the top ``drop_most_displacing`` fraction of its pairs by normalised CHES. Every rank
        scores every pair (the same weights and code give every rank the same ranking; no collective is needed
        before the process group exists)."""
        fraction = self.hp.drop_most_displacing
        if score is None:
            raise InputError("drop_most_displacing needs the initial policy to score the training pairs (run through "
                             "dynlab fit)", field="data.drop_most_displacing")
        pairs = self.training_pairs(tokenizer, rows)
        scores = score(pairs)
        drop = {pairs[i]["index"]: scores[i] for i in top_fraction([s["ches_norm"] for s in scores], fraction)}
        self.dropped_pairs = [{"index": i, "prompt": rows[i]["prompt"], **{k: v for k, v in s.items() if k != "index"}}
                              for i, s in drop.items()]
        self._dropped_written = False
        log.warning("data.drop_most_displacing=%g: dropped %d of %d training pairs (the highest normalised CHES under "
                    "the initial policy); listed in RUN_DIR/dropped_pairs.jsonl", fraction, len(drop), len(pairs))
        return [r for i, r in enumerate(rows) if i not in drop]

    def build_probe_sets(self, tokenizer, train_rows: list[dict] | None = None, heldout_rows: list[dict] | None = None,
                         generate: Callable[..., list[str]] | None = None,
                         splits: Sequence[str] = PROBE_SPLITS) -> dict[str, list[dict]]:
        """The probe texts of ``splits``, ``{split: [{"prompt", type: response, ...}]}``; warns once about the
        types that could not be built, and per split about a size larger than the rows at hand and about probe
        rows whose own ``irr_train`` response is not trained on."""
        hp = self.hp
        if train_rows is None or heldout_rows is None:
            train_rows, heldout_rows = self._read_rows(tokenizer)
        sources = {"train": (hp.probe_train_file, train_rows), "test": (hp.probe_test_file, heldout_rows)}
        backend = backend_from_spec(self._rephraser, seed=hp.seed) if self._rephraser else None
        skipped_all: set[str] = set()
        sets = {}
        for split in splits:
            file, rows = sources[split]
            rows = load_rows(file, format="probe", require_rejected=False) if file else rows  # rejected optional
            size, name = self.probe_size_of(split)
            if len(rows) < size:
                log.warning("data.%s is %d, but only %d probe_%s rows are available: probing those", name, size,
                            len(rows), split)
            rows = rows[:size]
            if hp.rebuild_irr_train:  # both splits: irr_train is built from train_rows below
                rows = [{k: v for k, v in r.items() if k != "irr_train"} for r in rows]
            else:
                _warn_untrained_irr_train(rows, train_rows, split)
            if hp.sample_chosen_initial and any("chosen_initial" not in r for r in rows):
                rows = self._with_chosen_initial(tokenizer, rows, generate)
            if backend is not None:
                rows = add_rephrases(rows, backend)
            sets[split], skipped = build_probe_rows(rows, train_pool=train_rows, test_pool=heldout_rows,
                                                    types=hp.probe_types, seed=hp.seed)
            skipped_all.update(skipped)
        if skipped_all:
            log.warning("probe types skipped (not in the data and not buildable here): %s", sorted(skipped_all))
        return sets

    def probe_size_of(self, split: str) -> tuple[int, str]:
        """The prompts of probe split ``split`` and the setting that gave them (``probe_train_size`` or
        ``probe_size``)."""
        own = self.hp.get(f"probe_{split}_size")
        return (self.hp.probe_size, "probe_size") if own is None else (own, f"probe_{split}_size")

    def _with_chosen_initial(self, tokenizer, rows: list[dict],
                             generate: Callable[..., list[str]] | None) -> list[dict]:
        if generate is None:
            raise InputError("sample_chosen_initial needs the policy to sample from (run through dynlab fit)",
                             field="data.sample_chosen_initial")
        prompts = [keep_prompt_end(tokenizer, tokenizer(r["prompt"])["input_ids"], self.hp.max_prompt_length)
                   for r in rows]
        samples = generate(prompts, max_new_tokens=self.hp.chosen_initial_max_tokens, seed=self.hp.seed)
        return [{**r, "chosen_initial": r.get("chosen_initial", s)} for r, s in zip(rows, samples)]

    def _read_rows(self, tokenizer, view: TrainingView | None = None) -> tuple[list[dict], list[dict]]:
        """The training and held-out rows; only DPO needs a rejected response in every row."""
        hp = self.hp
        if hp.source == "synthetic":
            rows = make_synthetic((hp.num_train or 256) + hp.num_heldout, seed=hp.seed)
            self._heldout_origin = (hp.source, len(rows) - hp.num_heldout)
            return rows[: len(rows) - hp.num_heldout], rows[len(rows) - hp.num_heldout:]
        render = None
        if getattr(tokenizer, "chat_template", None):
            def render(messages):
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kwargs = dict(config_name=hp.config_name, data_dir=hp.data_dir, format=hp.format, render_chat=render,
                      require_rejected=view == "dpo")
        if hp.heldout_split is None:
            n = None if hp.num_train is None else hp.num_train + hp.num_heldout
            rows = load_rows(hp.source, split=hp.split, limit=n, **kwargs)
            cut = len(rows) - hp.num_heldout if hp.num_train is None else min(hp.num_train, len(rows))
            train, heldout = rows[:cut], rows[cut:]
            self._heldout_origin = (hp.source, cut)
        else:
            train = load_rows(hp.source, split=hp.split, limit=hp.num_train, **kwargs)
            heldout = load_rows(hp.source, split=hp.heldout_split, limit=hp.num_heldout, **kwargs)
            self._heldout_origin = (f"{hp.source}[{hp.heldout_split}]", 0)
        if not train or not heldout:
            raise InputError(f"need training and held-out rows, got {len(train)} and {len(heldout)}; "
                             f"lower data.num_heldout or set data.heldout_split", file=hp.source)
        return train, heldout

    def _encode(self, tokenizer, row: dict, index: int, file: str, row_offset: int = 0) -> dict:
        responses = {k: v for k, v in row.items() if k != "prompt"}
        prompt_ids, encoded = encode_row(tokenizer, row["prompt"], responses, max_length=self.hp.max_length,
                                         max_prompt_length=self.hp.max_prompt_length,
                                         response_truncation=self.hp.response_truncation, file=file,
                                         row=row_offset + index + 1)
        return {"index": index, "prompt_ids": prompt_ids, "responses": encoded}

    def _training_view(self, tokenizer, rows: list[dict], view: TrainingView) -> list[dict]:
        """The examples ``view`` trains on. SFT needs no rejected response; ExtendSFT trains on the chosen response
        alone where a row has none (one warning with the count); DPO's rows all have one (``_read_rows``)."""
        pairs = [self._encode(tokenizer, {k: r[k] for k in ("prompt", "chosen", "rejected") if k in r}, i,
                              self.hp.source) for i, r in enumerate(rows)]
        if view == "dpo":
            return [{"index": p["index"], "prompt_ids": p["prompt_ids"], "chosen_ids": p["responses"]["chosen"],
                     "rejected_ids": p["responses"]["rejected"]} for p in pairs]
        keys = ("chosen", "rejected") if view == "extend" else ("chosen",)
        lacking = sum("rejected" not in p["responses"] for p in pairs)
        if view == "extend" and lacking:
            log.warning("ExtendSFT: %d of %d training rows have no rejected response: those train on their chosen "
                        "response alone", lacking, len(pairs))
        examples = [(p, k) for p in pairs for k in keys if k in p["responses"]]
        return [{"index": i, "prompt_ids": p["prompt_ids"], "response_ids": p["responses"][k]}
                for i, (p, k) in enumerate(examples)]

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        if self._prepared_for is None:
            self.prepare(module.tokenizer, module.training_view, module.generate, getattr(module, "score_pairs", None))
        if self.dropped_pairs and not self._dropped_written:
            # every rank asks (log_dir is a collective under DDP), rank 0 writes: the run directory exists by now
            run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            if self.trainer.is_global_zero:
                write_jsonl(run_dir / "dropped_pairs.jsonl", self.dropped_pairs)
            self._dropped_written = True

    # ---- loaders --------------------------------------------------------------------------------------------------
    def _shard(self, dataset: Sequence) -> ShardSampler:
        trainer = self.trainer
        return ShardSampler(dataset, trainer.world_size if trainer else 1, trainer.global_rank if trainer else 0)

    def train_dataloader(self) -> DataLoader:
        # the shuffle depends on the seed and epoch alone (not on the global RNG other loaders consume), and a
        # resumed run skips the batches of its current epoch that it already trained on
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = ResumableSampler(self.train_examples, world, rank, seed=self.hp.seed)
        if trainer is not None and trainer.state.fn == "fit" and trainer.global_step:
            # from the optimizer steps taken, not Lightning's epoch and batch progress: a step checkpoint lags by
            # one batch, and at an epoch's last batch still names the finished epoch
            sampler.resume(trainer.global_step, self.hp.batch_size, trainer.accumulate_grad_batches)
        return ResumableLoader(self.train_examples, batch_size=self.hp.batch_size, sampler=sampler,
                               collate_fn=self._collate, num_workers=self.hp.num_workers)

    def ordered_train_dataloader(self) -> DataLoader:
        """The training examples in order, sharded over ranks (for cached reference log-probs)."""
        dataset = self.train_examples
        return DataLoader(dataset, batch_size=self.hp.batch_size, sampler=self._shard(dataset),
                          collate_fn=self._collate, num_workers=self.hp.num_workers)

    def probe_dataloader(self, split: str) -> DataLoader:
        dataset = self.probe_examples[split]
        return DataLoader(dataset, batch_size=self.hp.probe_batch_size, sampler=self._shard(dataset),
                          collate_fn=collate_probes, num_workers=self.hp.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        # during fit the module runs probe evaluation itself, at step 0 and on its own cadence
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []
        return [self.probe_dataloader(split) for split in PROBE_SPLITS]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.probe_dataloader(split) for split in PROBE_SPLITS]


def _warn_untrained_irr_train(rows: list[dict], train_rows: list[dict], split: str) -> None:
    """Warn once when the rows of probe split ``split`` carry their own ``irr_train`` response (the paper's probe
    file does) that is not the chosen response of any training row: that signal then measures a response never
    trained on (in probe_test too, where irr_train is a training row's response on a held-out prompt)."""
    trained = {r["chosen"] for r in train_rows}
    carried = [r["irr_train"] for r in rows if isinstance(r.get("irr_train"), str)]
    untrained = sum(text not in trained for text in carried)
    if untrained:
        log.warning("%d of %d probe_%s rows carry an irr_train response that is not the chosen response of any "
                    "training row: their irr_train measures a response never trained on (data.rebuild_irr_train=true "
                    "builds irr_train from the training rows instead)", untrained, len(rows), split)
