"""The embedded synthetic preference + probe dataset: questions over a small built-in fact base, a correct chosen
answer, a wrong or unhelpful rejected one, and template-made rephrases. Deterministic from a seed; written for dynlab.
"""

from __future__ import annotations

import random

from dynlab.corpus import (
    CLOSERS,
    FACT_KINDS,
    OFF_TOPIC,
    OPENERS,
    REFUSALS,
    SENTENCE_POOL,
    FactKind,
    corpus,
    other_fact,
)

__all__ = ["CLOSERS", "FACT_KINDS", "OFF_TOPIC", "OPENERS", "REFUSALS", "SENTENCE_POOL", "SYNTHETIC_TYPES", "FactKind",
           "capacity", "corpus", "make_synthetic"]  # the text tables live in dynlab.corpus; importable here as before

SYNTHETIC_TYPES = ("chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat")


def make_synthetic(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Build ``n`` preference rows with distinct prompts and the template rephrase probe types.

    Each row has ``prompt`` (``"\\n\\nHuman: {question}\\n\\nAssistant:"``), ``chosen`` (a correct answer),
    ``rejected`` (a confidently wrong fact, a refusal or an off-topic reply) and :data:`SYNTHETIC_TYPES`: the
    ``*_gptsemantic`` types say the same thing with another template, the ``*_gptformat`` types keep the template
    and swap in another fact. Responses start with a single space.

    Args:
        n: number of rows, at most :func:`capacity`.
        seed: seeds the choice and order of questions, templates and rephrases.

    Returns:
        The rows; the same seed gives the same rows.

    Raises:
        ValueError: if ``n`` is negative or above the capacity.
    """
    if not 0 <= n <= capacity():
        raise ValueError(f"make_synthetic can build 0 to {capacity()} rows with distinct prompts, not {n}")
    rng = random.Random(seed)
    return [_make_row(rng, *combo) for combo in rng.sample(_combinations(), n)]


def capacity() -> int:
    """The most rows :func:`make_synthetic` can build with distinct prompts."""
    return len(_combinations())


def _combinations() -> list[tuple[int, int, int, int, int]]:
    return [(k, f, q, o, c) for k, kind in enumerate(FACT_KINDS) for f in range(len(kind.facts))
            for q in range(len(kind.questions)) for o in range(len(OPENERS)) for c in range(len(CLOSERS))]


def _make_row(rng: random.Random, k: int, f: int, q: int, o: int, c: int) -> dict[str, str]:
    kind = FACT_KINDS[k]
    fact, other = _fields(kind, f), _fields(kind, other_fact(rng, kind, f))
    question = OPENERS[o] + kind.questions[q].format(**fact) + CLOSERS[c]
    chosen, chosen_semantic = rng.sample(kind.answers, 2)

    style = rng.choices(("wrong", "refusal", "off_topic"), weights=(2, 1, 1))[0]
    templates = {"wrong": kind.wrong, "refusal": REFUSALS, "off_topic": OFF_TOPIC}[style]
    rejected, rejected_semantic = rng.sample(templates, 2)
    # a wrong answer takes another fact's answer; its format rephrase is a third fact with a wrong answer too
    fact["wrong"] = other["answer"]
    other_rejected = _fields(kind, other_fact(rng, kind, f))
    other_rejected["wrong"] = kind.facts[other_fact(rng, kind, f, other_rejected["answer"])]["answer"]
    return {
        "prompt": f"\n\nHuman: {question}\n\nAssistant:",
        "chosen": chosen.format(**fact),
        "rejected": rejected.format(**fact),
        "chosen_gptsemantic": chosen_semantic.format(**fact),
        "chosen_gptformat": chosen.format(**other),
        "reject_gptsemantic": rejected_semantic.format(**fact),
        "reject_gptformat": rejected.format(**other_rejected),
    }


def _fields(kind: FactKind, index: int) -> dict[str, str]:
    fact = kind.facts[index]
    return {**fact, "topic": kind.topic.format(**fact)}
