"""On-policy DPO batches: the batch rebuilt with responses sampled from the policy (SPIN's rejected, online DPO's
chosen and rejected), the ranking of k samples by a ``dynlab judge`` backend (a reward model's scores, or a pairwise
judge's Copeland wins), the per-step samples file and the samples' statistics. DPOModule (dynlab.modules.dpo) calls
them; nothing here imports Lightning."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dynlab.data.tokenize import collate_sequences
from dynlab.errors import InputError
from dynlab.evaluation.judge import JUDGE_SPECS, SCORES, Judge, RewardModelJudge, combine_orders
from dynlab.evaluation.repetition import distinct_n, repeated_ngram_fraction, words
from dynlab.losses.logps import IGNORE_INDEX

# --- batches --------------------------------------------------------------------------------------------------------


def with_sampled_rejected(batch: dict[str, Tensor], prompts: Sequence[Sequence[int]],
                          samples: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, Tensor]:
    """The DPO batch with rejected row k = prompt k + sample k (labels -100 on the prompt and padding); the chosen
    rows are kept as they are (right-padded further when a rejected row is longer) and ``index`` is kept.
    batch (2B, T), B prompts and samples -> batch (2B, T') with T' = max(T, longest prompt + sample)."""
    half = batch["input_ids"].shape[0] // 2
    if not len(prompts) == len(samples) == half:
        raise ValueError(f"need {half} prompts and samples (one per pair), got {len(prompts)} and {len(samples)}")
    rejected = collate_sequences(prompts, samples, pad_token_id)
    width = max(batch["input_ids"].shape[1], rejected["input_ids"].shape[1])
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key, value in fill.items():
        chosen, new = batch[key][:half], rejected[key].to(batch[key].device)
        out[key] = torch.cat([nn.functional.pad(chosen, (0, width - chosen.shape[1]), value=value),
                              nn.functional.pad(new, (0, width - new.shape[1]), value=value)])
    out.update({k: v for k, v in batch.items() if k not in fill})  # index (B,), and anything else the batch holds
    return out


def with_sampled_pairs(batch: dict[str, Tensor], prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                       rejected: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, Tensor]:
    """The DPO batch with both responses replaced: chosen row k = prompt k + chosen k, rejected row B + k = prompt k +
    rejected k (labels -100 on the prompts and padding); ``index`` and any other key are kept.
    batch (2B, T), B prompts and responses of each kind -> batch (2B, T'), T' = the longest prompt + response."""
    half = batch["input_ids"].shape[0] // 2
    if not len(prompts) == len(chosen) == len(rejected) == half:
        raise ValueError(f"need {half} prompts, chosen and rejected (one per pair), got {len(prompts)}, "
                         f"{len(chosen)} and {len(rejected)}")
    out = {k: v.to(batch["input_ids"].device)
           for k, v in collate_sequences([*prompts, *prompts], [*chosen, *rejected], pad_token_id).items()}
    out.update({k: v for k, v in batch.items() if k not in out})
    return out


# --- ranking --------------------------------------------------------------------------------------------------------


@dataclass
class Ranking:
    """One prompt's k samples ordered by a ranker.

    Args:
        values: each sample's reward (``scores``) or Copeland win count (``wins``).
        best: the sample that becomes the chosen response (the first of the highest values).
        worst: the sample that becomes the rejected response (the last of the lowest values).
        tied: best and worst are equally good (equal values, or the same response): the pair is left out of the loss.
    """

    values: list[float]
    best: int
    worst: int
    tied: bool

    @property
    def margin(self) -> float:
        """Best minus worst value (0 for a tie)."""
        return self.values[self.best] - self.values[self.worst]


def rank_values(values: Sequence[float], samples: Sequence[Sequence[int]] | None = None) -> Ranking:
    """Best = the first of the highest values, worst = the last of the lowest (ties in the ranking broken by sample
    order, so best != worst for k >= 2); tied when their values are equal or (given ``samples``) they are the same
    response. k values -> Ranking.

    >>> r = rank_values([0.5, 2.0, -1.0, 2.0])
    >>> r.best, r.worst, r.tied, r.margin
    (1, 2, False, 3.0)
    >>> r = rank_values([1.0, 1.0, 1.0])
    >>> r.best, r.worst, r.tied
    (0, 2, True)
    """
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"ranking needs at least 2 samples, got {len(values)}")
    top, bottom = max(values), min(values)
    best = values.index(top)
    worst = len(values) - 1 - values[::-1].index(bottom)
    same = samples is not None and list(samples[best]) == list(samples[worst])
    return Ranking(values, best, worst, tied=top == bottom or same)


def copeland_wins(k: int, outcomes: dict[tuple[int, int], str]) -> list[float]:
    """Copeland scores of k samples from the outcome of every pair: ``outcomes[i, j]`` (i < j) is sample i's
    ``win``/``loss``/``tie`` against j (``combine_orders`` of both presentation orders); a win counts 1, a tie 0.5.
    k(k-1)/2 outcomes -> k win counts (summing to k(k-1)/2).

    >>> copeland_wins(3, {(0, 1): "win", (0, 2): "tie", (1, 2): "loss"})
    [1.5, 0.0, 1.5]
    """
    wins = [0.0] * k
    for i in range(k):
        for j in range(i + 1, k):
            score = SCORES[outcomes[i, j]]
            wins[i] += score
            wins[j] += 1.0 - score
    return wins


def rank_samples(judge: Judge, prompts: Sequence[str], samples: Sequence[Sequence[str]],
                 sample_ids: Sequence[Sequence[Sequence[int]]] | None = None) -> tuple[list[Ranking], str]:
    """Rank each prompt's samples with a ``dynlab judge`` backend, all prompts in one judge call: a reward model
    scores every sample (``scores``); a pairwise judge (local logit judge, OpenAI-compatible chat judge) judges every
    pair of a prompt's samples in both orders and ranks by Copeland wins (``wins``).

    Args:
        judge: from ``dynlab.evaluation.judge.judge_from_spec``.
        prompts: B prompts as text (the judge shows them through ``display_prompt``).
        samples: per prompt, its k sampled responses as text.
        sample_ids: the same responses as token ids; two identical responses are then a tie whatever the judge says.

    Returns:
        (B rankings, ``"scores"`` or ``"wins"``: what the rankings' values are).
    """
    ids = sample_ids if sample_ids is not None else [None] * len(prompts)
    if isinstance(judge, RewardModelJudge):
        flat = judge.score([(p, s) for p, row in zip(prompts, samples) for s in row])
        judge._scores.clear()  # its cache never hits on fresh samples and would grow with every step
        rankings, start = [], 0
        for row, row_ids in zip(samples, ids):
            rankings.append(rank_values(flat[start : start + len(row)], row_ids))
            start += len(row)
        return rankings, "scores"
    pairs = [(b, i, j) for b, row in enumerate(samples) for i in range(len(row)) for j in range(i + 1, len(row))]
    items = [(prompts[b], samples[b][i], samples[b][j]) for b, i, j in pairs]
    verdicts = [j.verdict for j in judge.judge(items + [(p, second, first) for p, first, second in items])]
    outcomes: list[dict[tuple[int, int], str]] = [{} for _ in samples]
    for (b, i, j), first, second in zip(pairs, verdicts[: len(items)], verdicts[len(items):]):
        outcomes[b][i, j] = combine_orders(first, second)
    rankings = [rank_values(copeland_wins(len(row), outcome), row_ids)
                for row, outcome, row_ids in zip(samples, outcomes, ids)]
    return rankings, "wins"


def ranked_rows(index: Sequence[int], prompts: Sequence[str], texts: Sequence[Sequence[str]],
                samples: Sequence[Sequence[Sequence[int]]], rankings: Sequence[Ranking], kind: str,
                seed: int) -> list[dict]:
    """The samples file's rows of a ranked step, one per prompt: its k samples (text, ids, tokens), their ``kind``
    (``scores`` or ``wins``), which became the ``chosen`` and the ``rejected``, whether they ``tied``, the seed."""
    return [{"index": int(i), "prompt": p, "samples": list(t), "tokens": [len(x) for x in s],
             "sample_ids": [list(x) for x in s], kind: r.values, "chosen": r.best, "rejected": r.worst,
             "tied": r.tied, "seed": seed}
            for i, p, t, s, r in zip(index, prompts, texts, samples, rankings)]


def kept_mean(losses: Tensor, keep: Tensor) -> Tensor:
    """The mean of ``losses`` over the kept pairs; with none kept, 0 that still has the losses' graph (every rank
    of a DDP run then still reduces gradients). losses (B,), keep (B,) bool -> ()."""
    if not keep.any():
        return losses.sum() * 0.0
    return losses[keep].mean()


def check_pairs_args(pairs: str, ranker: str | None, negatives: str, precompute_ref_logps: bool) -> None:
    """Refuse ``pairs``/``ranker`` settings that cannot run (InputError naming the field), before any weights load."""
    if pairs not in ("dataset", "policy_ranked"):
        raise InputError(f"must be 'dataset' or 'policy_ranked', got {pairs!r}", field="model.pairs")
    if pairs != "policy_ranked":
        if ranker is not None:
            raise InputError("a ranker orders sampled responses, which only pairs: policy_ranked has: drop it or set "
                             "pairs: policy_ranked", field="model.ranker")
        return
    if negatives == "policy":
        raise InputError("policy_ranked samples both responses, so negatives: policy (a sampled rejected against the "
                         "dataset's chosen) cannot apply too: keep one of them", field="model.pairs")
    if ranker is None:
        raise InputError("pairs: policy_ranked needs a ranker: rm:PATH, hf:PATH or openai:BASE_URL@MODEL[#KEY_ENV] "
                         "(e.g. hf:embedded:smollm2-135m-instruct)", field="model.ranker")
    check_ranker_spec(ranker)
    if precompute_ref_logps:
        raise InputError("pairs: policy_ranked samples responses that have no cached reference log-probs: drop "
                         "precompute_ref_logps", field="model.precompute_ref_logps")


def check_ranker_spec(spec: str) -> None:
    """Refuse a ranker spec that ``judge_from_spec`` cannot build, before any weights load (InputError naming
    ``model.ranker``); building it (and loading its weights) is left to fit start."""
    from dynlab.chat import parse_endpoint_spec
    from dynlab.evaluation.generation import resolve_model

    kind, _, rest = spec.partition(":")
    if kind not in ("openai", "hf", "rm") or not rest:
        raise InputError(f"expected {JUDGE_SPECS}, got {spec!r}", field="model.ranker")
    if kind == "openai":
        try:
            parse_endpoint_spec(spec)
        except InputError as err:
            raise InputError(err.message, field="model.ranker") from None
    if kind == "rm" and not Path(resolve_model(rest)).is_dir():
        raise InputError(f"rm:PATH needs a local HF directory of a sequence-classification reward model; {rest!r} "
                         "is none", field="model.ranker")


def place_judge(judge: Judge, device: torch.device) -> None:
    """Move a local judge's model to ``device`` (an endpoint judge has none)."""
    owner = judge.chat if hasattr(judge, "chat") else judge  # LogitJudge's LocalChatModel, or RewardModelJudge
    model = getattr(owner, "model", None)
    if isinstance(model, nn.Module):
        model.to(device)


# --- samples: file and statistics -----------------------------------------------------------------------------------


def write_samples(run_dir: Path, step: int, rank: int, rows: Sequence[dict]) -> Path:
    """Write a step's sample rows to RUN_DIR/samples/step_{step:08d}_rank{rank}.jsonl, one JSON object a line,
    atomically (a re-run step replaces its file whole)."""
    path = Path(run_dir) / "samples" / f"step_{step:08d}_rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)
    return path


def sample_stats(samples: Sequence[Sequence[int]], texts: Sequence[str], eos_token_id: int) -> dict[str, float]:
    """Statistics of one step's samples: ``length`` (mean tokens, EOS included), ``eos_fraction`` (ending in EOS),
    and on the decoded texts' words ``distinct_2`` and ``repeated_4gram`` (dynlab.evaluation.repetition), means over
    the samples long enough to have them (NaN when none is).

    >>> sample_stats([[5, 5, 0], [7]], ["a b a b", "x"], eos_token_id=0)
    {'length': 2.0, 'eos_fraction': 0.5, 'distinct_2': 0.6666666666666666, 'repeated_4gram': 0.0}
    """
    def mean(values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else math.nan

    tokens = [words(t) for t in texts]
    return {"length": mean([float(len(s)) for s in samples]),
            "eos_fraction": mean([float(bool(s) and s[-1] == eos_token_id) for s in samples]),
            "distinct_2": mean([distinct_n(t, 2) for t in tokens]),
            "repeated_4gram": mean([repeated_ngram_fraction(t, 4) for t in tokens])}
