"""Tests for dynlab.data.formats: every input format, every validation error, local files and the offline hub."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from dynlab.data.formats import (
    HH_ASSISTANT,
    PROBE_FILE_TYPES,
    default_render_chat,
    load_rows,
    parse_row,
    split_hh,
)
from dynlab.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures"
REAL_PROBE_FILE = Path(__file__).resolve().parents[2] / "shared/data/hh_probe/probe_test.jsonl"
FLAT = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}


def _chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def _chat_pair() -> dict[str, list[dict[str, str]]]:
    return {"chosen": _chat(("user", "Hi"), ("assistant", "Hello")),
            "rejected": _chat(("user", "Hi"), ("assistant", "No"))}


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- split_hh / default_render_chat ----------------------------------------------------------------------------------


def test_split_hh_cuts_at_the_last_assistant_marker() -> None:
    text = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D and more"
    assert split_hh(text) == ("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:", " D and more")


def test_split_hh_without_marker_raises() -> None:
    with pytest.raises(InputError, match="Assistant"):
        split_hh("\n\nHuman: no reply here")


def test_default_render_chat_is_hh_style_with_system_prepended() -> None:
    messages = _chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"))
    assert default_render_chat(messages) == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"


# --- parse_row: formats ----------------------------------------------------------------------------------------------


def test_hh_row_splits_prompt_and_responses() -> None:
    raw = {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"}
    assert parse_row(raw, file="f", row=1) == {"prompt": "\n\nHuman: Q" + HH_ASSISTANT, "chosen": " good",
                                               "rejected": " bad"}


def test_hh_row_with_different_prompts_names_rejected() -> None:
    raw = {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: other\n\nAssistant: bad"}
    with pytest.raises(InputError) as info:
        parse_row(raw, file="f.jsonl", row=3)
    assert (info.value.file, info.value.row, info.value.field) == ("f.jsonl", 3, "rejected")


def test_hh_row_without_marker_names_the_field() -> None:
    raw = {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "just text"}
    with pytest.raises(InputError, match="marker") as info:
        parse_row(raw, file="f", row=1)
    assert info.value.field == "rejected"


def test_chat_row_default_render_and_leading_space() -> None:
    raw = _chat_pair()
    assert parse_row(raw, file="f", row=1) == {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello",
                                               "rejected": " No"}


def test_chat_row_custom_renderer_gets_context_and_responses_stay_as_is() -> None:
    seen = []

    def render(messages: list[dict]) -> str:
        seen.append(messages)
        return "<|user|>" + messages[-1]["content"] + "<|assistant|>"

    raw = _chat_pair()
    out = parse_row(raw, file="f", row=1, render_chat=render)
    assert out == {"prompt": "<|user|>Hi<|assistant|>", "chosen": "Hello", "rejected": "No"}
    assert seen == [_chat(("user", "Hi"))]


def test_chat_row_with_only_replies_uses_the_prompt_string() -> None:
    raw = {"prompt": "Hi", "chosen": _chat(("assistant", "Hello")), "rejected": _chat(("assistant", "No"))}
    assert parse_row(raw, file="f", row=1)["prompt"] == "\n\nHuman: Hi\n\nAssistant:"


@pytest.mark.parametrize(
    ("chosen", "match"),
    [
        (_chat(("user", "Hi"), ("user", "Hello?")), "last message"),
        (_chat(("user", "Hi"), ("bot", "Hello")), "role 'bot'"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}], "content is a number"),
        ([{"role": "user", "content": "Hi"}, "Hello"], "not an object"),
        ([], "non-empty list"),
    ],
)
def test_bad_chat_messages_name_the_field(chosen: list, match: str) -> None:
    raw = {**_chat_pair(), "chosen": chosen}
    with pytest.raises(InputError, match=match) as info:
        parse_row(raw, file="f", row=2, format="chat")
    assert (info.value.row, info.value.field) == (2, "chosen")


def test_chat_rows_with_different_contexts_name_rejected() -> None:
    raw = {**_chat_pair(), "rejected": _chat(("user", "Yo"), ("assistant", "No"))}
    with pytest.raises(InputError) as info:
        parse_row(raw, file="f", row=1)
    assert info.value.field == "rejected"


def test_failing_chat_template_becomes_input_error() -> None:
    def render(messages: list[dict]) -> str:
        raise RuntimeError("Conversation roles must alternate")

    raw = _chat_pair()
    with pytest.raises(InputError, match="alternate"):
        parse_row(raw, file="f", row=1, render_chat=render)


def test_flat_row_drops_unknown_keys() -> None:
    assert parse_row({**FLAT, "source": "x", "irr_train": " kept only in probe rows"}, file="f", row=1,
                     format="flat") == FLAT


def test_probe_row_keeps_probe_types_and_drops_selfr_and_unknown_keys() -> None:
    raw = {**FLAT, "irr_hum": " A sentence.", "chosen_selfr": "transcript", "note": "x"}
    assert parse_row(raw, file="f", row=1) == {**FLAT, "irr_hum": " A sentence."}


def test_forced_flat_format_rejects_message_lists() -> None:
    raw = {"prompt": "Hi", "chosen": _chat(("assistant", "Hello")), "rejected": " No"}
    with pytest.raises(InputError, match="expected a string, got a list") as info:
        parse_row(raw, file="f", row=1, format="flat")
    assert info.value.field == "chosen"


def test_unknown_format_name_raises() -> None:
    with pytest.raises(InputError, match="unknown format"):
        parse_row(FLAT, file="f", row=1, format="yaml")  # type: ignore[arg-type]


# --- parse_row: validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "match"),
    [
        ({"prompt": "P", "chosen": " a"}, "rejected", "missing field"),
        ({**FLAT, "chosen": 3}, "chosen", "got a number"),
        ({**FLAT, "rejected": None}, "rejected", "got null"),
        ({**FLAT, "chosen": ""}, "chosen", "empty"),
        ({**FLAT, "rejected": " \n\t"}, "rejected", "empty"),
        ({**FLAT, "prompt": "  "}, "prompt", "prompt is empty"),
        ({**FLAT, "irr_test": 7}, "irr_test", "got a number"),
        ({"chosen": 1, "rejected": "x"}, "chosen", "got a number"),
    ],
)
def test_bad_fields_raise_one_line_errors_naming_file_row_field(raw: dict, field: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        parse_row(raw, file="data.jsonl", row=5)
    assert (info.value.file, info.value.row, info.value.field) == ("data.jsonl", 5, field)
    assert "\n" not in str(info.value) and str(info.value).startswith("data.jsonl: row 5: field")


def test_row_that_is_not_an_object_raises() -> None:
    with pytest.raises(InputError, match="not a JSON object but a list") as info:
        parse_row(["a", "b"], file="f", row=4)  # type: ignore[arg-type]
    assert (info.value.row, info.value.field) == (4, None)


def test_empty_responses_allowed_in_probe_rows_and_on_request() -> None:
    assert parse_row({**FLAT, "rejected": " ", "chosen_initial": ""}, file="f", row=1)["chosen_initial"] == ""
    assert parse_row({**FLAT, "rejected": ""}, file="f", row=1, allow_empty=True)["rejected"] == ""


SFT_ROWS = [  # the preferred response alone: flat, HH, chat chosen list, one chat `messages` conversation, a null
    {"prompt": FLAT["prompt"], "chosen": " Hello!"},
    {"chosen": FLAT["prompt"] + " Hello!"},
    {"chosen": _chat(("user", "Hi"), ("assistant", "Hello!"))},
    {"messages": _chat(("user", "Hi"), ("assistant", "Hello!"))},
    {"prompt": FLAT["prompt"], "chosen": " Hello!", "rejected": None},
]


@pytest.mark.parametrize("raw", SFT_ROWS, ids=["flat", "hh", "chat", "messages", "null_rejected"])
def test_sft_rows_parse_without_rejected_and_dpo_rows_still_need_it(raw: dict) -> None:
    assert parse_row(raw, file="f", row=1, require_rejected=False) == {"prompt": FLAT["prompt"], "chosen": " Hello!"}
    with pytest.raises(InputError, match="missing field|got null") as info:
        parse_row(raw, file="sft.jsonl", row=7)
    assert (info.value.file, info.value.row, info.value.field) == ("sft.jsonl", 7, "rejected")


def test_a_probe_row_without_rejected_is_refused_for_dpo_and_kept_as_probes() -> None:
    raw = {"prompt": FLAT["prompt"], "chosen": " Hello!", "irr_hum": " A sentence."}
    for format in ("auto", "probe"):
        with pytest.raises(InputError, match="missing field") as info:
            parse_row(raw, file="probe.jsonl", row=4, format=format, require_rejected=True)  # DPO
        assert (info.value.file, info.value.row, info.value.field) == ("probe.jsonl", 4, "rejected")
        for require_rejected in (False, None):  # SFT data; the default, where a probe set may leave it out
            assert parse_row(raw, file="f", row=1, format=format, require_rejected=require_rejected) == raw


def test_a_rejected_that_is_there_is_still_checked_in_sft_rows() -> None:
    for raw, match in (({**FLAT, "rejected": " "}, "empty"), ({**FLAT, "rejected": 3}, "got a number"),
                       ({"chosen": FLAT["prompt"] + " a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, "differs"),
                       ({"messages": _chat(("user", "Hi"), ("assistant", "a")),
                         "rejected": _chat(("user", "Yo"), ("assistant", "b"))}, "differ")):
        with pytest.raises(InputError, match=match) as info:
            parse_row(raw, file="f", row=1, require_rejected=False)
        assert info.value.field == "rejected"


def test_a_messages_conversation_must_end_with_the_assistant() -> None:
    with pytest.raises(InputError, match="last message") as info:
        parse_row({"messages": _chat(("user", "Hi"))}, file="f", row=2, require_rejected=False)
    assert info.value.field == "messages"


def test_load_rows_of_sft_data(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "sft.jsonl", [json.dumps(r) for r in SFT_ROWS])
    assert load_rows(str(path), require_rejected=False) == [{"prompt": FLAT["prompt"], "chosen": " Hello!"}] * 5
    with pytest.raises(InputError, match="row 1: field 'rejected': missing field"):
        load_rows(str(path))


# --- load_rows: local files ------------------------------------------------------------------------------------------


def test_load_hh_fixture() -> None:
    rows = load_rows(str(FIXTURES / "hh_small.jsonl"))
    assert len(rows) == 3
    assert rows[1]["prompt"].endswith("\n\nHuman: Something short.\n\nAssistant:")
    assert rows[1]["chosen"] == " Try a quick card game that takes twenty minutes."
    assert all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)


def test_load_ultrafeedback_fixture_json_and_parquet(tmp_path: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    source = FIXTURES / "ultrafeedback_small.json"
    rows = load_rows(str(source))
    assert rows[1] == {"prompt": "You are a poet.\n\nHuman: Give me a word that rhymes with cat.\n\nAssistant:",
                       "chosen": " Hat rhymes with cat.", "rejected": " Dog."}
    parquet = tmp_path / "uf.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(json.loads(source.read_text())), parquet)
    assert load_rows(str(parquet)) == rows


def test_jsonl_skips_blank_lines_and_limit_keeps_the_first_rows() -> None:
    path = str(FIXTURES / "flat_small.jsonl")
    assert [row["chosen"] for row in load_rows(path)] == [" Hi there!", " One, two, three."]
    assert [row["chosen"] for row in load_rows(path, limit=1)] == [" Hi there!"]
    assert load_rows(path, limit=0) == []


def test_jsonl_errors_name_the_line_number(tmp_path: Path) -> None:
    good = json.dumps(FLAT)
    path = _write_jsonl(tmp_path / "d.jsonl", [good, "", json.dumps({**FLAT, "chosen": None})])
    with pytest.raises(InputError) as info:
        load_rows(str(path))
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 3, "chosen")

    path = _write_jsonl(tmp_path / "e.jsonl", [good, '{"prompt": "x",'])
    with pytest.raises(InputError, match="not valid JSON") as info:
        load_rows(str(path))
    assert (info.value.row, info.value.field) == (2, None)

    path = _write_jsonl(tmp_path / "f.jsonl", [good, "[1, 2]"])
    with pytest.raises(InputError, match="not a JSON object") as info:
        load_rows(str(path))
    assert info.value.row == 2


@pytest.mark.parametrize(("text", "match"), [('{"rows": []}', "expected a JSON list"), ("[1, 2", "not valid JSON")])
def test_bad_json_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        load_rows(str(path))
    assert info.value.file == str(path)


def test_json_list_rows_are_numbered_from_one(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([FLAT, "oops"]))
    with pytest.raises(InputError, match="not a JSON object") as info:
        load_rows(str(path))
    assert info.value.row == 2


def test_gzipped_jsonl_and_json_lines_named_json(tmp_path: Path) -> None:
    lines = "\n".join(json.dumps(r) for r in (FLAT, {**FLAT, "chosen": " Hey."})) + "\n"
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as handle:
        handle.write(lines)
    (tmp_path / "d.json").write_text(lines)
    expected = [FLAT, {**FLAT, "chosen": " Hey."}]
    assert load_rows(str(tmp_path / "d.jsonl.gz")) == load_rows(str(tmp_path / "d.json")) == expected


@pytest.mark.parametrize("source", ["./missing.jsonl", "data/missing/rows", "missing.parquet", "/no/such/file.json"])
def test_missing_local_path(source: str) -> None:
    with pytest.raises(InputError, match="no such file") as info:
        load_rows(source)
    assert info.value.file == source


def test_unsupported_file_type_and_synthetic_source(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(InputError, match="unsupported file type"):
        load_rows(str(path))
    with pytest.raises(InputError, match="make_synthetic"):
        load_rows("synthetic")


@pytest.mark.skipif(not REAL_PROBE_FILE.exists(), reason="shared probe file not present")
def test_real_paper_probe_file_loads_as_is() -> None:
    rows = load_rows(str(REAL_PROBE_FILE))
    assert len(rows) == 500
    assert all(set(row) == {"prompt", *PROBE_FILE_TYPES} for row in rows)
    raw = [json.loads(line) for line in REAL_PROBE_FILE.read_text().splitlines()]
    assert rows[0] == {key: raw[0][key] for key in ("prompt", *PROBE_FILE_TYPES)}
    assert rows[120]["rejected"] == " "  # a blank HH response, kept in probe files
    assert all(row["prompt"].endswith(HH_ASSISTANT) for row in rows)
    assert len(load_rows(str(REAL_PROBE_FILE), format="probe", limit=7)) == 7


# --- load_rows: hub --------------------------------------------------------------------------------------------------


def _fails_fast(source: str, seconds: float) -> InputError:
    start = time.monotonic()
    with pytest.raises(InputError, match="cannot load dataset from the Hugging Face hub") as info:
        load_rows(source, data_dir="helpful-base")
    assert time.monotonic() - start < seconds
    assert info.value.file == source and "local .jsonl/.json/.parquet" in str(info.value)
    return info.value


def test_hub_unreachable_endpoint_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    assert "127.0.0.1:9 is unreachable" in str(_fails_fast("dynlab-test/no-such-dataset", 5))


def test_hub_in_offline_mode_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from huggingface_hub import constants

    # as if HF_HUB_OFFLINE=1 had been set before datasets was imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fails_fast("dynlab-test/no-such-dataset", 5)


def test_hub_with_default_settings_fails_fast_for_a_missing_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    # offline: the endpoint probe fails; online: the hub answers "not found"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    _fails_fast("dynlab-test/no-such-dataset", 10)


# --- errors name the field, line and file that are really wrong ------------------------------------------------------


@pytest.mark.parametrize("rejected", [_chat(("user", "Hi"), ("assistant", "No")), []])
def test_a_list_valued_rejected_beside_a_string_chosen_names_rejected(rejected: list) -> None:
    for raw in ({**FLAT, "rejected": rejected}, {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": rejected}):
        with pytest.raises(InputError, match="'chosen' is a string") as info:
            parse_row(raw, file="f.jsonl", row=2)
        assert (info.value.row, info.value.field) == (2, "rejected")


def test_a_row_without_prompt_or_hh_transcript_says_the_prompt_is_missing() -> None:
    with pytest.raises(InputError, match="missing field") as info:
        parse_row({"chosen": " Hello!", "rejected": " Go away."}, file="f.jsonl", row=4)
    assert (info.value.row, info.value.field) == (4, "prompt")
    with pytest.raises(InputError, match="missing field") as info:
        parse_row({"chosen": " Hello!"}, file="f.jsonl", row=4)
    assert info.value.field == "prompt"
    with pytest.raises(InputError, match="missing field") as info:  # a probe row needs its prompt too
        parse_row({"chosen": " Hello!", "irr_test": " Other."}, file="f.jsonl", row=5)
    assert (info.value.row, info.value.field) == (5, "prompt")


def test_a_local_directory_says_what_it_holds_not_the_hub(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not rows")
    with pytest.raises(InputError) as info:
        load_rows(str(tmp_path))
    message = str(info.value)
    assert "Hugging Face hub" not in message and "no .jsonl/.json/.parquet data files" in message
    assert "notes.txt" in message and info.value.file == str(tmp_path)
    _write_jsonl(tmp_path / "rows.jsonl", [json.dumps(FLAT)])
    assert load_rows(str(tmp_path)) == [FLAT]  # a directory of data files loads
    with pytest.raises(InputError, match="local directory") as info:
        load_rows(str(tmp_path), split="test")
    assert "Hugging Face hub" not in str(info.value) and "rows.jsonl" in str(info.value)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_invalid_utf8_names_the_line(tmp_path: Path, name: str) -> None:
    data = (json.dumps(FLAT) + "\n\n" + json.dumps(FLAT)[:-2]).encode() + b'\xff"}\n'
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(InputError, match="not valid UTF-8") as info:
        load_rows(str(path))
    assert (info.value.file, info.value.row) == (str(path), 3) and "\n" not in str(info.value)
    (tmp_path / "rows.json").write_bytes(b"[" + json.dumps(FLAT).encode() + b",\n" + data.splitlines()[-1] + b"]")
    with pytest.raises(InputError, match="line 2"):
        load_rows(str(tmp_path / "rows.json"))


def test_parquet_is_recognised_by_its_magic_bytes_whatever_its_name(tmp_path: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    for name in ("rows.jsonl", "rows.json", "rows.data"):
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist([FLAT]), tmp_path / name)
        assert load_rows(str(tmp_path / name)) == [FLAT]


@pytest.mark.parametrize(("line", "field"), [
    ('{"prompt": "P", "chosen": " a", "rejected": " b", "chosen": " c"}', "chosen"),
    ('{"chosen": [{"role": "user", "content": "x", "content": "y"}, {"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}', "chosen[0].content"),
])
def test_a_repeated_key_is_an_error_naming_file_row_and_key(tmp_path: Path, line: str, field: str) -> None:
    jsonl = _write_jsonl(tmp_path / "rows.jsonl", [json.dumps(FLAT), "", line])
    with pytest.raises(InputError, match="appears twice") as info:
        load_rows(str(jsonl))
    assert (info.value.file, info.value.row, info.value.field) == (str(jsonl), 3, field)
    (tmp_path / "rows.json").write_text(f"[{json.dumps(FLAT)}, {line}]")
    with pytest.raises(InputError, match="appears twice") as info:
        load_rows(str(tmp_path / "rows.json"))
    assert (info.value.row, info.value.field) == (2, field)
