"""``dynlab probe build``: probe sets in the paper's jsonl format from the synthetic set or a flat file, with the
initial model's samples and rephrases from a chat endpoint; bad input exits 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynlab.cli import main
from dynlab.data.formats import load_rows
from dynlab.data.probes import DETERMINISTIC_TYPES, PROBE_TYPES
from dynlab.data.rephrase import REPHRASE_TYPES
from dynlab.data.synthetic import SYNTHETIC_TYPES, make_synthetic
from tests.conftest import REPO, run_dynlab
from tests.test_chat import ChatServer, one_thread  # noqa: F401 - one_thread: a fixture used by name
from tests.test_rephrase import labelled_reply

FLAT_SMALL = REPO / "tests" / "fixtures" / "flat_small.jsonl"
POOLS = ["--num-train", "16", "--num-heldout", "8"]


def build(capsys, *args: str, out: str = "probe.jsonl") -> list[dict]:
    """Run ``dynlab probe build ARGS --out OUT``; check what it prints; the rows read back by the probe reader."""
    main(["probe", "build", *args, "--out", out])
    written = [json.loads(line) for line in Path(out).read_text(encoding="utf-8").splitlines()]
    printed = capsys.readouterr().out.strip()
    assert printed == f"{out}: {len(written)} rows, types {[t for t in written[0] if t != 'prompt']}"
    rows = load_rows(out, format="probe")
    assert rows == written  # the reader gives back exactly what was written: no key dropped or added
    return written


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["probe", "build", *args, "--out", "probe.jsonl"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynlab: error: "), err
    assert not Path("probe.jsonl").exists()
    return err[0]


@pytest.mark.parametrize("split", ["train", "test"])
def test_synthetic_source_gives_every_deterministic_and_rephrase_type(in_tmp, capsys, split):
    rows = build(capsys, "--size", "5", "--split", split, *POOLS)
    synthetic = make_synthetic(16 + 8, seed=0)
    source = synthetic[:16] if split == "train" else synthetic[16:]
    assert len(rows) == 5
    assert list(rows[0]) == ["prompt", *[t for t in PROBE_TYPES if t in DETERMINISTIC_TYPES + SYNTHETIC_TYPES]]
    chosen_pool = {r["chosen"] for r in synthetic}
    for row, src in zip(rows, source):
        assert {k: row[k] for k in ("prompt", "chosen", "rejected", *SYNTHETIC_TYPES)} == \
            {k: src[k] for k in ("prompt", "chosen", "rejected", *SYNTHETIC_TYPES)}
        assert sorted(row["random_permute"].split()) == sorted(row["chosen"].split())
        assert row["irr_train"] in {r["chosen"] for r in synthetic[:16]} and row["irr_test"] in chosen_pool
        assert sorted(row["random_nonhum"].split()) == sorted(row["irr_test"].split())
        assert row["irr_hum"].strip() and row["irr_hum"] not in chosen_pool


def test_the_same_seed_gives_the_same_file_and_another_seed_another(in_tmp, capsys):
    build(capsys, "--size", "4", *POOLS, out="a.jsonl")
    build(capsys, "--size", "4", *POOLS, out="b.jsonl")
    build(capsys, "--size", "4", *POOLS, "--seed", "1", out="c.jsonl")
    assert Path("a.jsonl").read_bytes() == Path("b.jsonl").read_bytes() != Path("c.jsonl").read_bytes()


def test_types_restricts_the_types(in_tmp, capsys):
    rows = build(capsys, "--size", "3", *POOLS, "--types", "chosen", "rejected", "irr_hum")
    assert len(rows) == 3 and all(list(row) == ["prompt", "chosen", "rejected", "irr_hum"] for row in rows)


@pytest.mark.usefixtures("one_thread")
def test_initial_model_adds_chosen_initial(in_tmp, capsys):
    types = ["--types", "chosen", "rejected", "chosen_initial"]
    rows = build(capsys, "--size", "3", *POOLS, "--initial-model", "tiny", *types)
    assert all(list(row) == ["prompt", "chosen", "rejected", "chosen_initial"] for row in rows)
    assert all(isinstance(row["chosen_initial"], str) for row in rows)
    assert len({row["chosen_initial"] for row in rows}) == 3  # one sample per prompt
    # seeded: the same command samples the same responses
    assert build(capsys, "--size", "3", *POOLS, "--initial-model", "tiny", *types, out="again.jsonl") == rows


@pytest.mark.usefixtures("one_thread")
def test_initial_model_with_every_type(in_tmp, capsys):
    rows = build(capsys, "--size", "2", *POOLS, "--initial-model", "tiny")
    assert list(rows[0]) == ["prompt", *PROBE_TYPES]


@pytest.mark.parametrize("split, irr", [("train", "irr_test"), ("test", "irr_train")])
def test_flat_file_with_an_openai_rephraser(in_tmp, capsys, monkeypatch, split, irr):
    monkeypatch.setenv("DYNLAB_TEST_KEY", "sk-probe-build-secret")
    with ChatServer(reply=labelled_reply) as server:
        rows = build(capsys, "--source", str(FLAT_SMALL), "--num-train", "1", "--num-heldout", "1", "--size", "1",
                     "--split", split, "--rephraser", f"openai:{server.base_url}@rephraser#DYNLAB_TEST_KEY")
    flat = [json.loads(line) for line in FLAT_SMALL.read_text().splitlines() if line.strip()]
    src, other = flat if split == "train" else flat[::-1]
    [row] = rows
    assert [row[k] for k in ("prompt", "chosen", "rejected")] == [src[k] for k in ("prompt", "chosen", "rejected")]
    for ptype, (response, mode) in REPHRASE_TYPES.items():  # the server's reply, label and quotes removed
        assert row[ptype] == f"{src[response]} of {mode}"
    # the other prompt's chosen response; a one-row pool has no other prompt for the other irr type
    assert row[irr] == other["chosen"] and ({"irr_train", "irr_test"} - {irr}).isdisjoint(row)
    assert server.requests and all(body["model"] == "rephraser" for _, _, body in server.requests)
    assert all(h["authorization"] == "Bearer sk-probe-build-secret" for _, h, _ in server.requests)
    assert "sk-probe-build-secret" not in Path("probe.jsonl").read_text()


def test_a_probe_set_without_rejected_reads_back(in_tmp, capsys):
    rows = build(capsys, "--size", "2", *POOLS, "--types", "chosen", "irr_hum")
    assert all(list(row) == ["prompt", "chosen", "irr_hum"] for row in rows)


def test_unknown_type_exits_2_with_one_line_naming_it(in_tmp, capsys):
    line = fails(capsys, "--size", "2", *POOLS, "--types", "chosen", "bogus_type")
    assert "'bogus_type'" in line and "unknown probe type" in line


def test_unknown_type_from_the_console_entry(in_tmp):
    result = run_dynlab("probe", "build", "--size", "2", *POOLS, "--types", "bogus_type", "--out", "p.jsonl",
                        cwd=in_tmp, timeout=120, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("dynlab: error: ") and "'bogus_type'" in result.stderr
    assert result.stdout == "" and not (in_tmp / "p.jsonl").exists()


@pytest.mark.parametrize("args, needle", [
    (["--types", "chosen", "chosen_initial"], "'chosen_initial'"),  # needs --initial-model
    (["--rephraser", "openai:localhost:8000/v1"], "openai:BASE_URL@MODEL"),
    (["--source", "no/such/prefs.jsonl"], "no/such/prefs.jsonl"),
    (["--source", str(FLAT_SMALL)], "held-out rows"),  # 16 training rows asked for, 2 in the file
])
def test_bad_input_exits_2_with_one_line(in_tmp, capsys, args, needle):
    assert needle in fails(capsys, "--size", "2", *POOLS, *args)
