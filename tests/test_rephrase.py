"""The rephrase probe types from a chat backend: a real loopback chat-completions server and the tiny local model."""

from __future__ import annotations

import logging

import pytest

from dynlab.chat import ChatEndpoint, LocalChatModel, backend_from_spec
from dynlab.data.rephrase import INSTRUCTIONS, REPHRASE_TYPES, add_rephrases, clean_reply, rephrase_messages
from dynlab.errors import InputError
from tests.test_chat import KEY, URL_SECRET, ChatServer, closed_port, leaked, one_thread  # noqa: F401 - a fixture

ROWS = [
    {"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "chosen": " Hi there!", "rejected": " No."},
    {"prompt": "\n\nHuman: Count to three.\n\nAssistant:", "chosen": " One, two, three.", "rejected": " Four.",
     "chosen_gptsemantic": " Already here."},
]


def labelled_reply(body: dict) -> str:
    """Answer like a chatty LLM: a label, quotes, and which text and instruction it was given."""
    [message] = body["messages"]
    instruction, _, response = message["content"].partition("\n\nResponse: ")
    mode = next(m for m, text in INSTRUCTIONS.items() if text == instruction)
    return f'Rephrased response: "{response} of {mode}"'


def test_add_rephrases_fills_the_four_types_from_an_endpoint():
    with ChatServer(reply=labelled_reply) as server:
        out = add_rephrases(ROWS, ChatEndpoint(server.base_url, "rephraser", backoff=0), temperature=0.5,
                            max_tokens=64)
    assert out[0] == {**ROWS[0], "chosen_gptsemantic": " Hi there! of semantic",
                      "chosen_gptformat": " Hi there! of format", "reject_gptsemantic": " No. of semantic",
                      "reject_gptformat": " No. of format"}
    assert out[1]["chosen_gptsemantic"] == " Already here."  # a value the row already has is kept
    assert out[1]["chosen_gptformat"] == " One, two, three. of format"
    assert out[1]["reject_gptformat"] == " Four. of format"
    assert len(server.requests) == 4 * 2 - 1  # nothing asked for the kept value
    assert {(b["model"], b["temperature"], b["max_tokens"]) for _, _, b in server.requests} == {("rephraser", 0.5, 64)}
    assert ROWS[0].keys() == {"prompt", "chosen", "rejected"}  # the input rows are not modified


def test_add_rephrases_only_the_types_asked_for():
    with ChatServer(reply=labelled_reply) as server:
        out = add_rephrases(ROWS, ChatEndpoint(server.base_url, "m"), types=["reject_gptformat"])
    assert [set(row) - set(src) for row, src in zip(out, ROWS)] == [{"reject_gptformat"}] * 2
    assert len(server.requests) == 2


def test_an_empty_reply_is_kept_and_warned_about(caplog):
    with ChatServer(reply=lambda body: '  ""  ') as server:
        out = add_rephrases(ROWS[:1], ChatEndpoint(server.base_url, "m"), types=["chosen_gptformat"])
    assert out[0]["chosen_gptformat"] == ""
    assert "1 of 1 chosen_gptformat rephrases came back empty" in caplog.text


def test_a_failing_rephraser_is_one_line_without_its_credentials(monkeypatch, capsys, caplog):
    monkeypatch.setenv("REPHRASE_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    backend = backend_from_spec(f"openai:http://user:{URL_SECRET}@127.0.0.1:{closed_port()}/v1@m#REPHRASE_KEY")
    backend.retries = 0
    with pytest.raises(InputError, match="the rephraser failed on chosen_gptformat") as err:
        add_rephrases(ROWS, backend, types=["chosen_gptformat"])
    assert err.value.field == "rephraser" and "\n" not in str(err.value) and "127.0.0.1" in str(err.value)
    assert leaked(err.value, URL_SECRET, KEY) == [] and err.value.__cause__ is None
    printed = capsys.readouterr()
    assert all(secret not in printed.out + printed.err + caplog.text for secret in (URL_SECRET, KEY))


@pytest.mark.parametrize(("spec", "logged"), [
    ("openai:http://127.0.0.1:8000@m", "openai:http://127.0.0.1:8000@m"),  # the host is no credential: it stays
    (f"openai:http://user:{URL_SECRET}@127.0.0.1:8000/v1@m", "openai:http://***@127.0.0.1:8000/v1@m"),
    (f"openai:https://user:{URL_SECRET}@example.org/v1", "openai:https://***@example.org/v1"),  # no @MODEL
])
def test_the_data_module_logs_the_rephraser_spec_redacted_as_the_judge_does(spec, logged):
    from dynlab.data.datamodule import ProbeDataModule

    dm = ProbeDataModule(rephraser=spec)
    assert dm.hparams.rephraser == dm.hparams_initial.rephraser == logged and dm._rephraser == spec


def test_rephrase_messages_name_the_instruction_and_the_text():
    [message] = rephrase_messages("  Hi there!\n", "format")
    assert message["role"] == "user"
    assert message["content"] == INSTRUCTIONS["format"] + "\n\nResponse: Hi there!"
    assert set(REPHRASE_TYPES.values()) == {(s, m) for s in ("chosen", "rejected") for m in INSTRUCTIONS}


@pytest.mark.parametrize("reply, cleaned", [
    ("Paris is the capital.", " Paris is the capital."),
    ("  Paris is the capital.\n", " Paris is the capital."),
    ('Rephrased response: "Paris is the capital."', " Paris is the capital."),
    ("Rewritten response: Lyon is the capital.", " Lyon is the capital."),
    ("Response: 'Paris.'", " Paris."),
    ('"Rephrased response: Paris."', " Paris."),  # the label inside the quotes
    ("rephrased response: Paris.", " Paris."),
    ('He said "no"', ' He said "no"'),  # quotes that are part of the text stay
    ('"Yes" and "no"', ' "Yes" and "no"'),
    ("It's what it's", " It's what it's"),
    ('""', ""),
    ("   ", ""),
])
def test_clean_reply(reply, cleaned):
    assert clean_reply(reply) == cleaned


class CountingLocalModel(LocalChatModel):
    """The tiny local model, recording how add_rephrases calls it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def complete(self, *args, **kwargs):
        raise AssertionError("a local model should be given whole batches")

    def complete_many(self, conversations, **kwargs):
        self.batches.append(len(conversations))
        return super().complete_many(conversations, **kwargs)


@pytest.mark.usefixtures("one_thread")
def test_add_rephrases_with_the_tiny_local_model():
    model = CountingLocalModel("tiny", seed=1)
    out = add_rephrases(ROWS, model, max_tokens=6)
    assert model.batches == [1, 2, 2, 2]  # one batch per type; the kept chosen_gptsemantic is not asked for
    for row, src in zip(out, ROWS):
        assert set(row) == set(src) | set(REPHRASE_TYPES)
        assert all(isinstance(row[t], str) for t in REPHRASE_TYPES)
        assert all(row[t] == "" or row[t].startswith(" ") for t in REPHRASE_TYPES)
    assert out[1]["chosen_gptsemantic"] == " Already here."
    assert add_rephrases(ROWS, CountingLocalModel("tiny", seed=1), max_tokens=6) == out  # seeded


def test_rephraser_credentials_are_written_nowhere_in_the_run(tmp_path):
    # the synthetic set has every rephrase type, so the endpoint is never called: only the spec travels
    from tests.conftest import CONFIGS, run_dynlab

    spec = f"openai:http://user:{URL_SECRET}@127.0.0.1:{closed_port()}/v1@some-model"
    proc = run_dynlab("fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
                      f"--data.init_args.rephraser={spec}", "--trainer.max_steps=1", cwd=tmp_path, timeout=600,
                      env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".wandb" for p in files)
    assert [p for p in files if URL_SECRET.encode() in p.read_bytes()] == []
    assert URL_SECRET not in proc.stdout + proc.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_starts_the_redacted_wandb_run_even_before_the_processes_launch(rank, tmp_path, monkeypatch):
    # before Lightning launches the DDP processes, trainer.is_global_zero is True in every local child
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    from dynlab.cli import start_wandb_redacted

    started = []

    class RecordingWandbLogger(WandbLogger):
        @property
        def experiment(self):
            started.append(rank)

    monkeypatch.setattr(rank_zero_only, "rank", rank)
    start_wandb_redacted(SimpleNamespace(is_global_zero=True, loggers=[RecordingWandbLogger(save_dir=str(tmp_path),
                                                                                             offline=True)]))
    assert started == ([0] if rank == 0 else [])
