"""Build probe sets from preference rows: each probe row is a prompt with one response per probe type
(PAPER_NOTES §4), copying the types a row already has and building the ones that need no model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from dynlab.errors import InputError

PROBE_TYPES: tuple[str, ...] = (
    "chosen", "rejected", "chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat",
    "chosen_initial", "irr_train", "irr_test", "irr_hum", "random_permute", "random_nonhum",
)
# the types preference rows give without a model (rejected only where the rows have one: SFT data may not)
DETERMINISTIC_TYPES = ("chosen", "rejected", "irr_train", "irr_test", "irr_hum", "random_permute", "random_nonhum")

# Why a type that no row carries cannot be built here.
_NEEDS = {
    "chosen": "every preference row needs it",
    "rejected": "cannot be built (SFT data without rejected responses: leave it out of data.probe_types)",
    "chosen_gptsemantic": "cannot be built without a rephraser",
    "chosen_gptformat": "cannot be built without a rephraser",
    "reject_gptsemantic": "cannot be built without a rephraser",
    "reject_gptformat": "cannot be built without a rephraser",
    "chosen_initial": "needs samples from the initial model",
    "irr_train": "needs a train_pool row with another prompt",
    "irr_test": "needs a test_pool row with another prompt",
    "irr_hum": "needs a non-empty sentence pool",
    "random_permute": "needs the row's chosen response",
    "random_nonhum": "needs the row's irr_test response",
}


def build_probe_rows(
    rows: Sequence[dict],
    *,
    train_pool: Sequence[dict],
    test_pool: Sequence[dict],
    types: Sequence[str] | None = None,
    seed: int = 0,
    sentence_pool: Sequence[str] | None = None,
) -> tuple[list[dict[str, str]], list[str]]:
    """Give each row one response per probe type.

    A row's own value of a type is kept. Otherwise: ``irr_train``/``irr_test`` are the chosen response of a
    random ``train_pool``/``test_pool`` row with another prompt; ``irr_hum`` joins sentences of the pool and cuts
    them to the chosen response's word count; ``random_permute`` shuffles the words of ``chosen`` and
    ``random_nonhum`` those of ``irr_test``. Rephrases and ``chosen_initial`` are only copied, so they need every
    row to have them. Each row and type has its own seeded RNG, so results do not depend on which types are asked.

    Args:
        rows: preference rows with ``prompt`` and ``chosen``, maybe ``rejected`` and other probe types (a type
            some row lacks and that cannot be built, ``rejected`` of SFT data say, is skipped).
        train_pool: rows of the training data, for ``irr_train``.
        test_pool: held-out rows, for ``irr_test``.
        types: the probe types to build; ``None`` builds every buildable type of :data:`PROBE_TYPES`.
        seed: seeds every random choice and shuffle.
        sentence_pool: fluent sentences unrelated to the prompts for ``irr_hum`` (default
            ``dynlab.data.synthetic.SENTENCE_POOL``).

    Returns:
        The probe rows ``{"prompt", <type>: response, ...}`` (types in :data:`PROBE_TYPES` order) and, when
        ``types`` is ``None``, the types that could not be built (for the caller to report once).

    Raises:
        InputError: for an unknown type, a named type that cannot be built, or a row without prompt or chosen.
    """
    if sentence_pool is None:
        from dynlab.data.synthetic import SENTENCE_POOL

        sentence_pool = SENTENCE_POOL
    for i, row in enumerate(rows, 1):
        for key in ("prompt", "chosen"):
            if not isinstance(row.get(key), str):
                raise InputError("probe rows need a prompt and a chosen response (strings)", row=i, field=key)
    wanted = PROBE_TYPES if types is None else _check_names(types)
    builders = _builders(train_pool, test_pool, sentence_pool, seed)

    built: dict[str, list[str]] = {}
    for name in PROBE_TYPES:  # dependency order: irr_test before random_nonhum
        values = [row[name] if isinstance(row.get(name), str) else builders[name](i, row, built)
                  for i, row in enumerate(rows)]
        missing = [i for i, value in enumerate(values, 1) if value is None]
        if not missing:
            built[name] = values
        elif types is not None and name in wanted:
            shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise InputError(f"probe type {name!r} is not in the data (rows {shown}) and {_NEEDS[name]}", field=name)
    names = [name for name in PROBE_TYPES if name in wanted and name in built]
    probe_rows = [{"prompt": row["prompt"], **{name: built[name][i] for name in names}} for i, row in enumerate(rows)]
    skipped = [name for name in PROBE_TYPES if name not in built] if types is None else []
    return probe_rows, skipped


def shuffle_words(text: str, rng: random.Random) -> str:
    """The words of ``text`` in a random order, as a response with a leading space (``text`` if it has no words).

    Reshuffles a few times when the order comes out unchanged and the words are not all the same.
    """
    words = text.split()
    if not words:
        return text
    shuffled = list(words)
    for _ in range(5):
        rng.shuffle(shuffled)
        if shuffled != words or len(set(words)) == 1:
            break
    return " " + " ".join(shuffled)


def sentence_of_length(n_words: int, pool: Sequence[str], rng: random.Random) -> str:
    """Join shuffled ``pool`` sentences and cut them to ``n_words`` words (at least one), ending with a period."""
    order = list(pool)
    rng.shuffle(order)
    words: list[str] = []
    while len(words) < max(n_words, 1):
        words += " ".join(order).split()
    text = " ".join(words[: max(n_words, 1)]).rstrip(",;:-")
    return " " + (text if text.endswith((".", "!", "?")) else text + ".")


Builder = Callable[[int, dict, dict[str, list[str]]], str | None]


def _builders(train_pool: Sequence[dict], test_pool: Sequence[dict], sentence_pool: Sequence[str],
              seed: int) -> dict[str, Builder]:
    """One function per type: (row index, row, types built so far) -> response, or None when it cannot be built."""

    def rng(name: str, i: int) -> random.Random:
        return random.Random(f"{seed}/{name}/{i}")

    def copy_only(i: int, row: dict, built: dict[str, list[str]]) -> None:
        return None

    def irr(pool: Sequence[dict], name: str) -> Builder:
        def build(i: int, row: dict, built: dict[str, list[str]]) -> str | None:
            other = _pick_other(pool, row["prompt"], rng(name, i))
            return None if other is None else other["chosen"]
        return build

    def irr_hum(i: int, row: dict, built: dict[str, list[str]]) -> str | None:
        if not any(sentence.split() for sentence in sentence_pool):
            return None
        return sentence_of_length(len(row["chosen"].split()), sentence_pool, rng("irr_hum", i))

    def random_permute(i: int, row: dict, built: dict[str, list[str]]) -> str:
        return shuffle_words(row["chosen"], rng("random_permute", i))

    def random_nonhum(i: int, row: dict, built: dict[str, list[str]]) -> str | None:
        irr_test = built["irr_test"][i] if "irr_test" in built else None
        return None if irr_test is None else shuffle_words(irr_test, rng("random_nonhum", i))

    return {**dict.fromkeys(PROBE_TYPES, copy_only), "irr_train": irr(train_pool, "irr_train"),
            "irr_test": irr(test_pool, "irr_test"), "irr_hum": irr_hum, "random_permute": random_permute,
            "random_nonhum": random_nonhum}


def _pick_other(pool: Sequence[dict], prompt: str, rng: random.Random) -> dict | None:
    """A random pool row with a prompt other than ``prompt`` and a chosen response, or None if there is none."""
    def usable(row: dict) -> bool:
        return row.get("prompt") != prompt and isinstance(row.get("chosen"), str)

    for _ in range(8):  # cheap tries first; pools are large and prompts mostly distinct
        if pool and usable(candidate := pool[rng.randrange(len(pool))]):
            return candidate
    others = [row for row in pool if usable(row)]
    return rng.choice(others) if others else None


def _check_names(types: Sequence[str]) -> tuple[str, ...]:
    if isinstance(types, str):
        types = [types]
    unknown = [name for name in types if name not in PROBE_TYPES]
    if unknown:
        raise InputError(f"unknown probe type(s) {', '.join(map(repr, unknown))}; valid: {', '.join(PROBE_TYPES)}",
                         field=unknown[0])
    return tuple(types)
