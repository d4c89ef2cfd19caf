"""On-policy sampling in DPO (SPIN-style negatives, online DPO's ranked pairs): the sampling settings, the seed of a
step's samples and the prompts of a DPO batch. (The batches rebuilt with the samples, their ranking and statistics are
in dynlab.modules.onpolicy: they use the data and evaluation layers, which the model layer does not import.)"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields

from torch import Tensor

from dynlab.errors import InputError
from dynlab.losses.logps import IGNORE_INDEX


@dataclass
class SamplingSpec:
    """How the policy samples responses (``model.negatives: policy``, ``model.pairs: policy_ranked``).

    Args:
        temperature: softmax temperature (> 0).
        top_p: nucleus sampling mass in (0, 1] (1 = the full distribution).
        max_new_tokens: the most tokens a sampled response has (a response that hits it has no EOS).
        seed: base seed; a step's samples are drawn from a seed hashed from (seed, global step, rank).
        num_samples: responses sampled per prompt by ``pairs: policy_ranked`` (k >= 2; the ranker's best becomes the
            chosen, its worst the rejected); ``negatives: policy`` samples one.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    num_samples: int = 2


def as_sampling_spec(value: SamplingSpec | dict | None) -> SamplingSpec:
    """A checked SamplingSpec from itself, its dict (the form a checkpoint's hyper_parameters hold) or None (the
    defaults); an InputError names the bad field."""
    if value is None:
        value = SamplingSpec()
    elif not isinstance(value, SamplingSpec):
        given = {k: v for k, v in dict(value).items() if not k.startswith("_")}
        known = {f.name for f in fields(SamplingSpec)}
        if unknown := sorted(set(given) - known):
            raise InputError(f"unknown field {unknown[0]!r}; expected some of {', '.join(sorted(known))}",
                             field=f"model.sampling.{unknown[0]}")
        value = SamplingSpec(**given)
    if not 0 < value.temperature < math.inf:
        raise InputError(f"must be > 0 and finite, got {value.temperature}", field="model.sampling.temperature")
    if not 0 < value.top_p <= 1:
        raise InputError(f"must be in (0, 1], got {value.top_p}", field="model.sampling.top_p")
    if not isinstance(value.max_new_tokens, int) or value.max_new_tokens < 1:
        raise InputError(f"must be an integer of at least 1, got {value.max_new_tokens!r}",
                         field="model.sampling.max_new_tokens")
    if not isinstance(value.num_samples, int) or isinstance(value.num_samples, bool) or value.num_samples < 2:
        raise InputError(f"must be an integer of at least 2 (the best and the worst of k samples form a pair), got "
                         f"{value.num_samples!r}", field="model.sampling.num_samples")
    return value


def sample_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of the samples of optimizer step ``step`` on ``rank``: a hash of the three (the same in every
    process and Python version), below 2**62 so per-batch offsets stay in torch's seed range.

    >>> sample_seed(0, 3, 1) == sample_seed(0, 3, 1) != sample_seed(0, 3, 0)
    True
    """
    digest = hashlib.sha256(f"dynlab-sampling:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def prompt_ids_of(batch: dict[str, Tensor]) -> list[list[int]]:
    """Each pair's prompt ids from a DPO batch (chosen rows ``[:B]``): the tokens with attention_mask 1 and label
    -100. input_ids, attention_mask, labels (2B, T) -> B lists."""
    half = batch["input_ids"].shape[0] // 2
    ids, mask, labels = (batch[k][:half] for k in ("input_ids", "attention_mask", "labels"))
    prompt = (mask == 1) & (labels == IGNORE_INDEX)  # (B, T)
    return [row[keep].tolist() for row, keep in zip(ids, prompt)]
