"""Tests for dynlab.data.probes: which types are copied, built or skipped, and how each built type is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynlab.data.formats import load_rows
from dynlab.data.probes import DETERMINISTIC_TYPES, PROBE_TYPES, build_probe_rows
from dynlab.data.synthetic import SENTENCE_POOL, SYNTHETIC_TYPES, make_synthetic
from dynlab.errors import InputError

REAL_PROBE_FILE = Path(__file__).resolve().parents[2] / "shared/data/hh_probe/probe_test.jsonl"
BUILT_TYPES = ("irr_train", "irr_test", "irr_hum", "random_permute", "random_nonhum")


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict[str, str]]]:
    rows = make_synthetic(60, seed=5)
    return {"probe": rows[:12], "train": rows[:40], "test": rows[40:]}


def _build(data: dict, rows: list[dict] | None = None, **kwargs) -> tuple[list[dict[str, str]], list[str]]:
    return build_probe_rows(data["probe"] if rows is None else rows, train_pool=data["train"],
                            test_pool=data["test"], **kwargs)


def _flat(rows: list[dict]) -> list[dict[str, str]]:
    return [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows]


def test_all_buildable_types_and_skipped_ones(data: dict) -> None:
    probe_rows, skipped = _build(data)
    assert skipped == ["chosen_initial"]
    assert [list(row) for row in probe_rows] == [["prompt", *(t for t in PROBE_TYPES if t != "chosen_initial")]] * 12
    for row, source in zip(probe_rows, data["probe"]):
        assert {key: row[key] for key in ("prompt", "chosen", "rejected", *SYNTHETIC_TYPES)} == source


def test_flat_rows_get_only_the_deterministic_types(data: dict) -> None:
    probe_rows, skipped = _build(data, _flat(data["probe"]))
    assert skipped == [t for t in PROBE_TYPES if t not in DETERMINISTIC_TYPES]
    assert set(probe_rows[0]) == {"prompt", *DETERMINISTIC_TYPES}


def test_irrelevant_responses_come_from_other_prompts_of_each_pool(data: dict) -> None:
    probe_rows, _ = _build(data)
    train = {row["chosen"]: row["prompt"] for row in data["train"]}
    test = {row["chosen"]: row["prompt"] for row in data["test"]}
    for row in probe_rows:
        assert train[row["irr_train"]] != row["prompt"]
        assert test[row["irr_test"]] != row["prompt"]
    assert len({row["irr_train"] for row in probe_rows}) > 3  # a random pick, not always the same row


def test_irr_hum_matches_the_chosen_length_and_ends_a_sentence(data: dict) -> None:
    pool_words = {word.strip(".") for sentence in SENTENCE_POOL for word in sentence.split()}
    for row in _build(data)[0]:
        assert len(row["irr_hum"].split()) == len(row["chosen"].split())
        assert row["irr_hum"].startswith(" ") and row["irr_hum"].endswith(".")
        assert {word.strip(".") for word in row["irr_hum"].split()} <= pool_words


def test_shuffles_keep_the_words_and_the_leading_space(data: dict) -> None:
    for row in _build(data)[0]:
        assert sorted(row["random_permute"].split()) == sorted(row["chosen"].split())
        assert sorted(row["random_nonhum"].split()) == sorted(row["irr_test"].split())
        for key in ("random_permute", "random_nonhum"):
            assert row[key].startswith(" ") and not row[key].startswith("  ")
        assert row["random_permute"] != row["chosen"] and row["random_nonhum"] != row["irr_test"]


def test_one_word_and_blank_responses_still_shuffle_to_something() -> None:
    rows = [{"prompt": "P1", "chosen": " Yes", "rejected": " No"}, {"prompt": "P2", "chosen": " ", "rejected": " No"}]
    probe_rows, _ = build_probe_rows(rows, train_pool=rows, test_pool=rows, types=["random_permute", "irr_hum"])
    assert [row["random_permute"] for row in probe_rows] == [" Yes", " "]
    assert [len(row["irr_hum"].split()) for row in probe_rows] == [1, 1]
    assert all(row["irr_hum"].endswith(".") for row in probe_rows)


def test_deterministic_for_a_seed_and_independent_of_the_types_asked(data: dict) -> None:
    full = _build(data, seed=3)[0]
    assert _build(data, seed=3)[0] == full
    assert _build(data, seed=4)[0] != full
    alone = _build(data, seed=3, types=["random_nonhum", "irr_hum"])[0]
    assert alone == [{key: row[key] for key in ("prompt", "irr_hum", "random_nonhum")} for row in full]


def test_a_row_keeps_its_own_values(data: dict) -> None:
    rows = [{**row, "irr_hum": " Mine.", "chosen_initial": " Sampled."} for row in data["probe"]]
    probe_rows, skipped = _build(data, rows)
    assert skipped == []
    assert {row["irr_hum"] for row in probe_rows} == {" Mine."}
    assert {row["chosen_initial"] for row in probe_rows} == {" Sampled."}


def test_named_type_missing_from_some_rows_raises_listing_them(data: dict) -> None:
    rows = [dict(row) for row in data["probe"]]
    for row in rows[1:]:
        del row["chosen_gptsemantic"]
    assert "chosen_gptsemantic" in _build(data, rows)[1]
    with pytest.raises(InputError, match=r"rows 2, 3, 4, 5, 6 and 6 more\) and cannot be built without a rephraser"):
        _build(data, rows, types=["chosen", "chosen_gptsemantic"])


def test_named_but_unbuildable_types_raise_with_the_type_as_field(data: dict) -> None:
    with pytest.raises(InputError, match="'chosen_initial' is not in the data") as info:
        _build(data, types=["chosen_initial"])
    assert info.value.field == "chosen_initial"
    with pytest.raises(InputError, match="sentence pool") as info:
        _build(data, types=["irr_hum"], sentence_pool=[])
    assert _build(data, sentence_pool=[])[1] == ["chosen_initial", "irr_hum"]


def test_pools_without_another_prompt_cannot_give_irrelevant_responses(data: dict) -> None:
    rows = data["probe"][:1]
    probe_rows, skipped = build_probe_rows(rows, train_pool=rows, test_pool=[])
    assert skipped == ["chosen_initial", "irr_train", "irr_test", "random_nonhum"]
    assert "random_permute" in probe_rows[0]
    with pytest.raises(InputError, match="train_pool") as info:
        build_probe_rows(rows, train_pool=rows, test_pool=data["test"], types=["irr_train"])
    assert info.value.field == "irr_train"


def test_unknown_type_lists_the_valid_names(data: dict) -> None:
    with pytest.raises(InputError, match="unknown probe type.*'chosen_selfr'.*valid: chosen, rejected") as info:
        _build(data, types=["chosen", "chosen_selfr"])
    assert info.value.field == "chosen_selfr"


def test_rows_without_a_chosen_response_raise(data: dict) -> None:
    with pytest.raises(InputError) as info:
        _build(data, [{"prompt": "P", "rejected": " No"}])
    assert (info.value.row, info.value.field) == (1, "chosen")


@pytest.mark.skipif(not REAL_PROBE_FILE.exists(), reason="shared probe file not present")
def test_real_probe_rows_keep_their_types_and_rebuild_the_missing_ones() -> None:
    real = load_rows(str(REAL_PROBE_FILE), limit=20)
    rows, pool = real[:6], real[6:]
    probe_rows, skipped = build_probe_rows(rows, train_pool=rows, test_pool=pool)
    assert skipped == [] and probe_rows == [{"prompt": row["prompt"], **{t: row[t] for t in PROBE_TYPES}}
                                            for row in rows]

    stripped = [{key: value for key, value in row.items() if key not in BUILT_TYPES} for row in rows]
    rebuilt, skipped = build_probe_rows(stripped, train_pool=rows, test_pool=pool)
    assert skipped == []
    for new, old in zip(rebuilt, rows):
        assert {t: new[t] for t in PROBE_TYPES if t not in BUILT_TYPES} == {t: old[t] for t in PROBE_TYPES
                                                                             if t not in BUILT_TYPES}
        assert new["irr_train"] in {row["chosen"] for row in rows if row["prompt"] != new["prompt"]}
        assert new["irr_test"] in {row["chosen"] for row in pool}
        assert sorted(new["random_permute"].split()) == sorted(old["chosen"].split())
        assert len(new["irr_hum"].split()) == len(old["chosen"].split())


def test_rows_without_rejected_skip_it_and_naming_it_says_why(data: dict) -> None:
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in data["probe"]]
    probe_rows, skipped = _build(data, rows)
    assert "rejected" in skipped and set(probe_rows[0]) == {"prompt", *DETERMINISTIC_TYPES} - {"rejected"}
    with pytest.raises(InputError, match="SFT data without rejected responses") as info:
        _build(data, rows, types=["chosen", "rejected"])
    assert info.value.field == "rejected"


# ---- the data module's irr_train: carried by the data, or rebuilt from the training rows ---------------------------
def _probe_file(tmp_path: Path, n: int = 12) -> Path:
    """Probe-format rows whose own irr_train is the chosen response of no row in the file (as in the paper's file,
    whose irr_train comes from training rows it does not hold), except row 2's, which is row 0's chosen."""
    import json

    rows = [{"prompt": f"\n\nHuman: Question {i}?\n\nAssistant:", "chosen": f" Answer {i}.",
             "rejected": f" No idea {i}.", "irr_train": f" Elsewhere {i}."} for i in range(n)]
    rows[2]["irr_train"] = rows[0]["chosen"]
    path = tmp_path / "probe_format.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rebuild", [False, True])
def test_carried_irr_train_never_trained_on_is_said_or_rebuilt(rebuild, tmp_path, caplog) -> None:
    import logging

    from dynlab.data.datamodule import ProbeDataModule
    from dynlab.models.load import tiny_tokenizer

    dm = ProbeDataModule(source=str(_probe_file(tmp_path)), num_train=8, num_heldout=4, probe_size=4,
                         rebuild_irr_train=rebuild)
    with caplog.at_level(logging.WARNING, logger="dynlab.data.datamodule"):
        sets = dm.build_probe_sets(tiny_tokenizer())
    said = [r.getMessage() for r in caplog.records if "irr_train" in r.getMessage()]
    trained = {f" Answer {i}." for i in range(8)}
    # probe_test's irr_train is also a training row's response (on a held-out prompt), so both splits are checked
    irr_train = {split: [row["irr_train"] for row in sets[split]] for split in ("train", "test")}
    if rebuild:
        assert said == [] and all(text in trained for texts in irr_train.values() for text in texts)
        assert all(row["irr_train"] != row["chosen"] for row in sets["train"])  # another row's
    else:
        tail = " rows carry an irr_train response that is not the chosen response of any training row"
        assert [m.split(":")[0] for m in said] == [f"3 of 4 probe_train{tail}", f"4 of 4 probe_test{tail}"], said
        assert all("data.rebuild_irr_train=true" in m for m in said)
        assert irr_train == {"train": [" Elsewhere 0.", " Elsewhere 1.", " Answer 0.", " Elsewhere 3."],
                             "test": [f" Elsewhere {i}." for i in range(8, 12)]}  # kept as given


def test_a_probe_test_file_without_rejected_has_its_irr_train_rebuilt_from_the_training_rows(tmp_path) -> None:
    import json

    from dynlab.data.datamodule import ProbeDataModule
    from dynlab.models.load import tiny_tokenizer

    source = _probe_file(tmp_path)
    probes = tmp_path / "probe_test.jsonl"  # e.g. `dynlab probe build --types chosen irr_train irr_hum`: no rejected
    probes.write_text("".join(json.dumps({"prompt": f"\n\nHuman: Held out {i}?\n\nAssistant:", "chosen": f" Yes {i}.",
                                          "irr_train": " Never trained.", "irr_hum": " A sentence."}) + "\n"
                              for i in range(4)))
    dm = ProbeDataModule(source=str(source), num_train=8, num_heldout=4, probe_size=4, probe_test_file=str(probes),
                         rebuild_irr_train=True)
    test = dm.build_probe_sets(tiny_tokenizer(), splits=["test"])["test"]
    assert len(test) == 4 and all("rejected" not in row and row["irr_hum"] == " A sentence." for row in test)
    assert all(row["irr_train"] in {f" Answer {i}." for i in range(8)} for row in test)


@pytest.mark.skipif(not REAL_PROBE_FILE.exists(), reason="shared probe file not present")
def test_the_papers_probe_file_as_training_data_says_its_irr_train_is_not_trained_on(caplog) -> None:
    import logging

    from dynlab.data.datamodule import ProbeDataModule
    from dynlab.models.load import tiny_tokenizer

    with caplog.at_level(logging.WARNING, logger="dynlab.data.datamodule"):
        ProbeDataModule(source=str(REAL_PROBE_FILE), num_train=40, num_heldout=40, probe_size=16).build_probe_sets(
            tiny_tokenizer(), splits=["train"])
    said = [r.getMessage() for r in caplog.records if "probe_train rows carry an irr_train" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(")") and " of 16 probe_train rows" in said[0], said
