"""Tests for dynlab.data.synthetic: determinism, distinct prompts, lengths and what each rephrase keeps or changes."""

from __future__ import annotations

import re

import pytest

from dynlab.data.formats import parse_row
from dynlab.data.synthetic import (
    FACT_KINDS,
    OFF_TOPIC,
    REFUSALS,
    SENTENCE_POOL,
    SYNTHETIC_TYPES,
    FactKind,
    capacity,
    corpus,
    make_synthetic,
)

RESPONSE_KEYS = ("chosen", "rejected", *SYNTHETIC_TYPES)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return make_synthetic(300, seed=7)


def _has_word(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def _renderings(text: str, templates_of: str) -> list[tuple[FactKind, str, int]]:
    """Every (kind, template, fact index) whose correct-answer or wrong-answer template renders ``text``."""
    found = []
    for kind in FACT_KINDS:
        for template in getattr(kind, templates_of):
            for i, fact in enumerate(kind.facts):
                fields = {**fact, "topic": kind.topic.format(**fact)}
                wrongs = [other["answer"] for other in kind.facts] if templates_of == "wrong" else [""]
                if any(template.format(**fields, wrong=wrong) == text for wrong in wrongs):
                    found.append((kind, template, i))
    return found


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    assert make_synthetic(40, seed=3) == make_synthetic(40, seed=3)
    assert make_synthetic(40, seed=3) != make_synthetic(40, seed=4)


def test_prompts_are_distinct_up_to_capacity() -> None:
    assert capacity() >= 2000
    for n in (2000, capacity()):
        prompts = [row["prompt"] for row in make_synthetic(n, seed=1)]
        assert len(set(prompts)) == n
    with pytest.raises(ValueError, match="distinct prompts"):
        make_synthetic(capacity() + 1)
    with pytest.raises(ValueError):
        make_synthetic(-1)
    assert make_synthetic(0) == []


def test_hh_prompt_format_and_response_lengths(rows: list[dict[str, str]]) -> None:
    for row in rows:
        assert set(row) == {"prompt", *RESPONSE_KEYS}
        assert re.fullmatch(r"\n\nHuman: [^\n]+\?[^\n]*\n\nAssistant:", row["prompt"])
        for key in RESPONSE_KEYS:
            assert row[key].startswith(" ") and not row[key].startswith("  "), (key, row[key])
            assert 8 <= len(row[key].split()) <= 35, (key, row[key])


def test_each_type_differs_from_the_response_it_rephrases(rows: list[dict[str, str]]) -> None:
    for row in rows:
        assert len({row["chosen"], row["chosen_gptsemantic"], row["chosen_gptformat"]}) == 3
        assert len({row["rejected"], row["reject_gptsemantic"], row["reject_gptformat"]}) == 3
        assert row["rejected"] != row["chosen"]


def test_chosen_rephrases_keep_the_fact_or_the_template(rows: list[dict[str, str]]) -> None:
    for row in rows:
        [(kind, template, fact)] = _renderings(row["chosen"], "answers")
        answer, subject = kind.facts[fact]["answer"], kind.facts[fact]["subject"]
        assert _has_word(row["prompt"], subject)
        # semantic: another template, same fact
        [(s_kind, s_template, s_fact)] = _renderings(row["chosen_gptsemantic"], "answers")
        assert (s_kind, s_fact) == (kind, fact) and s_template != template
        assert _has_word(row["chosen_gptsemantic"], answer)
        # format: same template, another fact, and the original answer is gone
        [(f_kind, f_template, f_fact)] = _renderings(row["chosen_gptformat"], "answers")
        assert (f_kind, f_template) == (kind, template) and f_fact != fact
        assert not _has_word(row["chosen_gptformat"], answer)


def test_rejected_mixes_wrong_facts_refusals_and_off_topic_replies(rows: list[dict[str, str]]) -> None:
    styles = {"wrong": 0, "refusal": 0, "off_topic": 0}
    for row in rows:
        if wrong := _renderings(row["rejected"], "wrong"):
            kind, template, fact = wrong[0]
            styles["wrong"] += 1
            assert not _has_word(row["rejected"], kind.facts[fact]["answer"])  # stated, but wrong
            assert _renderings(row["reject_gptsemantic"], "wrong")[0][1] != template
            assert any(t == template and f != fact for _, t, f in _renderings(row["reject_gptformat"], "wrong"))
        else:
            style = "refusal" if any(_matches(row["rejected"], t) for t in REFUSALS) else "off_topic"
            templates = REFUSALS if style == "refusal" else OFF_TOPIC
            assert [t for t in templates if _matches(row["rejected"], t)] != [t for t in templates
                                                                            if _matches(row["reject_gptsemantic"], t)]
            assert any(_matches(row["reject_gptformat"], t) for t in templates)
            styles[style] += 1
    assert sum(styles.values()) == len(rows) and min(styles.values()) >= len(rows) // 10, styles


def _matches(text: str, template: str) -> bool:
    return re.fullmatch(re.escape(template).replace(re.escape("{topic}"), ".+"), text) is not None


def test_rows_parse_as_probe_rows(rows: list[dict[str, str]]) -> None:
    for i, row in enumerate(rows, 1):
        assert parse_row(row, file="synthetic", row=i, format="probe") == row
        assert parse_row(row, file="synthetic", row=i) == row


def test_sentence_pool_is_fluent_and_unrelated_to_the_facts() -> None:
    assert len(set(SENTENCE_POOL)) == len(SENTENCE_POOL) >= 60
    facts = [value for kind in FACT_KINDS for fact in kind.facts for value in (fact["subject"], fact["answer"])]
    for sentence in SENTENCE_POOL:
        assert sentence[0].isupper() and sentence.endswith(".") and len(sentence.split()) >= 6
        assert not [fact for fact in facts if _has_word(sentence.lower(), fact.lower())], sentence


def test_corpus_covers_every_word_the_generator_emits() -> None:
    texts = corpus(seed=0)
    assert corpus(seed=0) == texts and set(SENTENCE_POOL) <= set(texts)
    vocabulary = {word for text in texts for word in text.split()}
    emitted = {word for row in make_synthetic(capacity(), seed=2) for text in row.values() for word in text.split()}
    assert emitted <= vocabulary
