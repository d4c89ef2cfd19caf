"""``dynlab judge``: both presentation orders asked of a loopback OpenAI-compatible server (key sent, never written),
retries, verdict parsing and combination, the bootstrap interval, and the local judges for real on tiny models: a
chat LM read from its next-token logits and a sequence-classification reward model."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from dynlab.chat import redact_spec
from dynlab.cli import main
from dynlab.errors import InputError
from dynlab.evaluation.judge import (
    LogitJudge,
    Pair,
    RewardModelJudge,
    bootstrap_ci,
    combine_orders,
    display_prompt,
    judge_from_spec,
    judge_messages,
    judge_pairs,
    pair_responses,
    parse_verdict,
    read_responses,
    summarize_verdicts,
    win_rate,
)
from dynlab.models.load import tiny_tokenizer
from dynlab.tracking.trajectory import write_jsonl
from tests.test_chat import KEY, URL_SECRET, ChatServer, closed_port, one_thread  # noqa: F401 - a fixture

PROMPTS = [f"\n\nHuman: Question number {i}?\n\nAssistant:" for i in range(5)]


def generation_file(path: str, responses: list[str], model: str, modes: tuple[str, ...] = ("greedy",)) -> str:
    rows = [{"prompt_index": i, "sample_index": 0, "mode": mode, "seed": None, "prompt": p, "response": r,
             "settings": {"model": model}} for mode in modes for i, (p, r) in enumerate(zip(PROMPTS, responses))]
    write_jsonl(path, rows)
    return path


def shown(body: dict) -> tuple[str, str]:
    """The responses a judge request shows as A and as B."""
    text = body["messages"][-1]["content"]
    m = re.search(r"Response A: (.*)\n\nResponse B: (.*)\n\nWhich response", text, re.S)
    return m.group(1), m.group(2)


def prefers_good(body: dict) -> str:
    """A sensible judge: the response containing GOOD wins, whichever position it is in."""
    first, second = shown(body)
    return "A" if "GOOD" in first else "Response B" if "GOOD" in second else "tie"


def judge_cli(capsys, *args: str, out: str = "judged") -> dict:
    main(["judge", *args, "--out", out])
    printed = capsys.readouterr()
    assert "A win rate" in printed.out and printed.err.count("dynlab: error") == 0
    summary = json.loads(Path(out, "summary.json").read_text())
    assert Path(out, "summary.md").read_text().strip() in printed.out
    return summary


# --- verdicts and statistics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, verdict", [
    ("A", "A"), ("B", "B"), (" b.", "B"), ("**A**", "A"), ("Response B", "B"), ("Answer: A", "A"),
    ("More helpful: B", "B"), ("Response A is more helpful than response B.", None),
    ("Response A is clearer.", "A"), ("tie", "tie"), ("They are equally helpful.", "tie"), ("Tie.", "tie"),
    ("I cannot say", None), ("", None), ("A good question. Both are fine.", "tie"),
    ("Comparison: B is more specific.\nB", "B"), ("A\n\nBecause it answers the question.", "A"),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_combine_orders_needs_both_orders_for_a_win():
    # the verdicts name positions; in the second call B was shown first
    assert combine_orders("A", "B") == "win" and combine_orders("B", "A") == "loss"
    for a_first, b_first in [("A", "A"), ("B", "B"), ("A", "tie"), ("tie", "B"), ("tie", "tie"), (None, "B"),
                             (None, None)]:
        assert combine_orders(a_first, b_first) == "tie", (a_first, b_first)


def test_win_rate_counts_ties_as_half():
    assert win_rate(["win"] * 3 + ["tie"] * 2 + ["loss"] * 5) == pytest.approx(0.4)


def test_bootstrap_all_wins_and_symmetric():
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0)
    assert bootstrap_ci([0.0] * 20) == (0.0, 0.0)
    lo, hi = bootstrap_ci([1.0, 0.0] * 50, resamples=2000, seed=0)
    assert lo < 0.5 < hi and 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # ~ 0.5 ± 1.96 * 0.05
    assert bootstrap_ci([1.0, 0.0] * 50, seed=0) == (lo, hi)  # seeded


def test_bootstrap_resamples_prompts_not_samples():
    # 10 prompts x 5 samples that always agree within a prompt: 10 independent units, not 50
    scores = [float(i % 2) for i in range(10) for _ in range(5)]
    groups = [i for i in range(10) for _ in range(5)]
    naive, clustered = bootstrap_ci(scores), bootstrap_ci(scores, groups)
    assert clustered[1] - clustered[0] > 1.5 * (naive[1] - naive[0])
    assert clustered[0] < 0.5 < clustered[1]


def record(a_first: str | None, b_first: str | None, prompt: str = "p", m1=None, m2=None) -> dict:
    return {"prompt": prompt, "verdict_a_first": a_first, "verdict_b_first": b_first, "mode": "greedy",
            "outcome": combine_orders(a_first, b_first), "margin_a_first": m1, "margin_b_first": m2}


def test_summary_counts_position_bias_and_agreement():
    records = [record("A", "B", "p0"), record("A", "A", "p1"), record("A", "A", "p2"), record(None, "tie", "p3")]
    s = summarize_verdicts(records, resamples=200)
    assert (s["pairs"], s["prompts"], s["wins"], s["losses"], s["ties"]) == (4, 4, 1, 0, 3)
    assert s["win_rate"] == pytest.approx(2.5 / 4)
    assert s["position_bias"] == pytest.approx(5 / 6)  # of the six decisive verdicts, only p0's second was "B"
    assert s["order_agreement"] == pytest.approx(2 / 4)  # p0 (A twice) and p3 (tie twice)
    assert s["unparsable"] == 1 and s["judge_calls"] == 8
    assert s["win_rate_a_first"] == pytest.approx(3.5 / 4) and s["win_rate_b_first"] == pytest.approx(1.5 / 4)
    assert "margin" not in s


def test_margins_separate_the_position_advantage_from_the_preference():
    # margin = first minus second shown; the judge adds +2 to whatever is first, and prefers A by 0.5
    records = [record("A", "A", f"p{i}", m1=2.5, m2=1.5) for i in range(6)]
    m = summarize_verdicts(records, resamples=100)["margin"]
    assert m["first_shown_advantage"] == pytest.approx(2.0)
    assert m["mean_preference_for_a"] == pytest.approx(0.5)
    assert m["debiased_win_rate"] == 1.0


def test_display_prompt_and_messages():
    assert display_prompt("\n\nHuman: Why?\n\nAssistant:") == "Why?"
    multi = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Why?\n\nAssistant:"
    assert display_prompt(multi) == "Human: Hi\n\nAssistant: Hello.\n\nHuman: Why?"
    assert display_prompt("<|im_start|>user\nWhy?") == "<|im_start|>user\nWhy?"
    system, user = judge_messages("\n\nHuman: Why?\n\nAssistant:", " first ", "second")
    assert system["role"] == "system" and "Query: Why?\n\nResponse A: first\n\nResponse B: second" in user["content"]
    assert '"tie"' in user["content"]
    assert '"tie"' not in judge_messages("q", "a", "b", allow_tie=False)[1]["content"]


def test_redact_hides_url_credentials():
    assert redact_spec("openai:https://user:pw@example.org/v1@m#MY_KEY") == "openai:https://***@example.org/v1@m#MY_KEY"
    assert redact_spec("openai:http://127.0.0.1:8/v1@m") == "openai:http://127.0.0.1:8/v1@m"
    assert redact_spec("openai:http://127.0.0.1:8000@m") == "openai:http://127.0.0.1:8000@m"  # no path: @m is the model
    assert redact_spec("openai:https://h/v1?api_key=pw@m") == "openai:https://h/v1?api_key=***@m"
    # no @MODEL: cut at the userinfo's @, "pw@example.org/v1" is no port and model; the whole spec is redacted
    assert redact_spec("openai:https://user:pw@example.org/v1") == "openai:https://***@example.org/v1"


# --- responses and pairing ------------------------------------------------------------------------------------------


def test_pairing_matches_prompt_mode_and_sample_in_any_order(in_tmp):
    a = generation_file("a.jsonl", [f"a{i}" for i in range(5)], "model-a", modes=("greedy", "sampled"))
    rows = [json.loads(x) for x in Path(a).read_text().splitlines()]
    write_jsonl("b.jsonl", [{**r, "response": r["response"].replace("a", "b")} for r in reversed(rows)])
    (a_rows, a_model), (b_rows, b_model) = read_responses("a.jsonl"), read_responses("b.jsonl")
    assert (a_model, b_model) == ("model-a", "model-a")
    pairs = pair_responses(a_rows, b_rows, "a.jsonl", "b.jsonl")
    assert len(pairs) == 10 and all(p.b == p.a.replace("a", "b") for p in pairs)


def test_pairing_errors_name_the_file_and_row(in_tmp):
    generation_file("a.jsonl", ["x"] * 5, "m")
    write_jsonl("b.jsonl", [{"prompt": p, "response": "y", "mode": "greedy"} for p in PROMPTS[:4]])
    with pytest.raises(InputError, match=r"a.jsonl: row 5: 1 prompt/sample\(s\) have no match in b.jsonl"):
        pair_responses(*read_responses("a.jsonl")[:1], *read_responses("b.jsonl")[:1], "a.jsonl", "b.jsonl")
    write_jsonl("d.jsonl", [{"prompt": "q", "response": "y"}, {"prompt": "q", "response": "z"}])
    with pytest.raises(InputError, match=r"d.jsonl: row 2: a second response .* \(first at row 1\)"):
        pair_responses(read_responses("d.jsonl")[0], [], "d.jsonl", "e.jsonl")
    write_jsonl("f.jsonl", [{"prompt": "q", "text": "y"}])
    with pytest.raises(InputError, match=r"f.jsonl: row 1: field 'response': .*FILE:FIELD"):
        read_responses("f.jsonl")


def test_file_colon_field_reads_another_column(in_tmp):
    write_jsonl("probe.jsonl", [{"prompt": p, "chosen": f"c{i}", "rejected": f"r{i}"} for i, p in enumerate(PROMPTS)])
    chosen, _ = read_responses("probe.jsonl:chosen")
    rejected, _ = read_responses("probe.jsonl:rejected")
    pairs = pair_responses(chosen, rejected, "probe.jsonl:chosen", "probe.jsonl:rejected")
    assert [(p.a, p.b, p.prompt_index) for p in pairs] == [(f"c{i}", f"r{i}", i) for i in range(5)]


# --- the HTTP judge against a loopback OpenAI-compatible server ----------------------------------------------------


def test_http_judge_asks_both_orders_sends_the_key_and_writes_it_nowhere(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    generation_file("a.jsonl", [f"GOOD answer {i}" for i in range(5)], "runs/extend/export")
    generation_file("b.jsonl", [f"weak answer {i}" for i in range(5)], "runs/base/export")
    with ChatServer(reply=prefers_good) as server:
        summary = judge_cli(capsys, "a.jsonl", "b.jsonl", "--judge", f"openai:{server.base_url}@judge-model#JUDGE_KEY")
    assert len(server.requests) == 10
    seen = [shown(body) for _, _, body in server.requests]
    for i in range(5):  # each prompt in both orders
        assert (f"GOOD answer {i}", f"weak answer {i}") in seen and (f"weak answer {i}", f"GOOD answer {i}") in seen
    for _, headers, body in server.requests:
        assert headers["authorization"] == f"Bearer {KEY}"
        assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 16
    overall = summary["overall"]
    assert (overall["wins"], overall["losses"], overall["ties"]) == (5, 0, 0)
    assert overall["win_rate"] == 1.0 and overall["ci"] == [1.0, 1.0]
    assert overall["position_bias"] == 0.5 and overall["order_agreement"] == 1.0 and overall["unparsable"] == 0
    assert summary["a"]["label"] == "runs/extend/export" and summary["b"]["label"] == "runs/base/export"
    assert summary["judge"].endswith("@judge-model#JUDGE_KEY") and summary["judge_kind"] == "ChatJudge"
    verdicts = [json.loads(x) for x in Path("judged/verdicts.jsonl").read_text().splitlines()]
    assert [(v["verdict_a_first"], v["verdict_b_first"], v["outcome"]) for v in verdicts] == [("A", "B", "win")] * 5
    assert verdicts[0]["reply_b_first"] == "Response B"
    for path in Path(".").rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path
    printed = capsys.readouterr()
    assert KEY not in printed.out + printed.err


def test_a_failing_judge_prints_one_line_without_its_credentials(in_tmp, capsys, caplog, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    generation_file("a.jsonl", ["x"] * 2, "a")
    generation_file("b.jsonl", ["y"] * 2, "b")
    spec = f"openai:http://user:{URL_SECRET}@127.0.0.1:{closed_port()}/v1@m#JUDGE_KEY"
    with pytest.raises(SystemExit) as exit_:
        main(["judge", "a.jsonl", "b.jsonl", "--judge", spec, "--retries", "0", "--out", "judged"])
    assert exit_.value.code == 2
    printed = capsys.readouterr()
    [line] = printed.err.strip().splitlines()
    assert "the judge failed" in line and "http://127.0.0.1:" in line
    assert all(secret not in printed.out + printed.err + caplog.text for secret in (URL_SECRET, KEY))


def test_http_judge_retries_a_500(in_tmp, capsys):
    generation_file("a.jsonl", ["GOOD"] * 2, "a")
    generation_file("b.jsonl", ["bad"] * 2, "b")
    with ChatServer(reply=prefers_good, statuses=(500,)) as server:
        summary = judge_cli(capsys, "a.jsonl", "b.jsonl", "--judge", f"openai:{server.base_url}@m", "--workers", "1",
                            "--retries", "1")
    # 2 pairs, 4 calls, the first answered 500 and retried
    assert len(server.requests) == 5 and summary["overall"]["wins"] == 2


def test_a_judge_that_always_says_a_is_all_position_bias(in_tmp, capsys):
    generation_file("a.jsonl", [f"GOOD {i}" for i in range(5)], "a")
    generation_file("b.jsonl", [f"bad {i}" for i in range(5)], "b")
    with ChatServer(reply=lambda body: "A") as server:
        s = judge_cli(capsys, "a.jsonl", "b.jsonl", "--judge", f"openai:{server.base_url}@m")["overall"]
    assert (s["wins"], s["ties"], s["win_rate"]) == (0, 5, 0.5)
    assert s["position_bias"] == 1.0 and s["order_agreement"] == 0.0
    assert (s["win_rate_a_first"], s["win_rate_b_first"]) == (1.0, 0.0)


def test_unparsable_replies_are_ties_and_counted(in_tmp, capsys):
    generation_file("a.jsonl", ["x"] * 5, "a")
    generation_file("b.jsonl", ["y"] * 5, "b")
    with ChatServer(reply=lambda body: "I cannot say") as server:
        s = judge_cli(capsys, "a.jsonl", "b.jsonl", "--judge", f"openai:{server.base_url}@m", "--mode", "greedy")
    assert s["overall"]["unparsable"] == 10 and s["overall"]["ties"] == 5 and s["overall"]["win_rate"] == 0.5


def test_modes_are_reported_separately_and_can_be_selected(in_tmp, capsys):
    generation_file("a.jsonl", [f"GOOD {i}" for i in range(5)], "a", modes=("greedy", "sampled"))
    generation_file("b.jsonl", [f"bad {i}" for i in range(5)], "b", modes=("greedy", "sampled"))
    with ChatServer(reply=prefers_good) as server:
        s = judge_cli(capsys, "a.jsonl", "b.jsonl", "--judge", f"openai:{server.base_url}@m", "--labels", "X", "Y")
        assert set(s["by_mode"]) == {"greedy", "sampled"} and s["overall"]["pairs"] == 10
        assert (s["a"]["label"], s["b"]["label"]) == ("X", "Y")
        s = judge_cli(capsys, "a.jsonl", "b.jsonl", "--judge", f"openai:{server.base_url}@m", "--mode", "sampled",
                      out="sampled")
        assert s["overall"]["pairs"] == 5 and s["by_mode"] == {}


@pytest.mark.parametrize("args, message", [
    (["--judge", "gpt4"], "field 'judge': expected openai:BASE_URL@MODEL"),
    (["--judge", "rm:./nowhere"], "nowhere: field 'judge': rm:PATH needs a local HF directory"),
    (["--judge", "hf:./nowhere"], "no such model directory"),
    (["--judge", "openai:http://127.0.0.1:9/v1@m", "--resamples", "0"], "field 'resamples/"),
    (["--judge", f"openai:https://u:{URL_SECRET}@127.0.0.1:9/v1"], "https://***@127.0.0.1:9/v1': BASE_URL's port"),
])
def test_bad_judge_input_exits_2_and_writes_nothing(in_tmp, capsys, args, message):
    generation_file("a.jsonl", ["x"] * 5, "a")
    generation_file("b.jsonl", ["y"] * 5, "b")
    with pytest.raises(SystemExit) as exit_:
        main(["judge", "a.jsonl", "b.jsonl", *args, "--out", "judged"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and URL_SECRET not in err[0], err
    assert not Path("judged").exists()


# --- local judges, for real on tiny models --------------------------------------------------------------------------


def tiny_config(tok, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       **extra)


@pytest.fixture
def tiny_chat_dir(tmp_path: Path) -> Path:
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    out = tmp_path / "tiny-chat"
    LlamaForCausalLM(tiny_config(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_rm_dir(tmp_path: Path) -> Path:
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    out = tmp_path / "tiny-rm"
    LlamaForSequenceClassification(tiny_config(tok, num_labels=1)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


PAIRS = [Pair(p, f"Paris is the answer to {i}.", "I do not know." if i % 2 else "Rome, maybe.", i, 0, "greedy")
         for i, p in enumerate(PROMPTS)]


@pytest.mark.usefixtures("one_thread")
def test_logit_judge_reads_a_against_b_from_the_next_token(tiny_chat_dir):
    judge = judge_from_spec(f"hf:{tiny_chat_dir}", batch_size=3)
    assert isinstance(judge, LogitJudge)
    records = judge_pairs(judge, PAIRS)
    # each margin is log p(A) - log p(B) of the unpadded prompt alone: batching with left padding changes nothing
    model, tok = judge.chat.model, judge.chat.tokenizer
    for p, r in zip(PAIRS, records):
        for (first, second), margin in (((p.a, p.b), r["margin_a_first"]), ((p.b, p.a), r["margin_b_first"])):
            ids = judge.chat.render(judge_messages(p.prompt, first, second, allow_tie=False))
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            a = torch.logsumexp(logp[judge.letter_ids["A"]], 0)
            b = torch.logsumexp(logp[judge.letter_ids["B"]], 0)
            assert margin == pytest.approx((a - b).item(), abs=1e-4)
        assert r["verdict_a_first"] == ("A" if r["margin_a_first"] > 0 else "B")
        assert r["outcome"] == combine_orders(r["verdict_a_first"], r["verdict_b_first"])
    assert tok.convert_ids_to_tokens(judge.letter_ids["A"])[0].endswith("A")
    # the same response in both positions: the two orders see the same text, so only position can decide
    same = judge_pairs(judge, [Pair(PROMPTS[0], "Same.", "Same.", 0, 0, None)])[0]
    assert same["margin_a_first"] == pytest.approx(same["margin_b_first"], abs=1e-5) and same["outcome"] == "tie"
    # a tie band wider than every margin makes every verdict a tie
    wide = LogitJudge(str(tiny_chat_dir), tie_margin=1e6)
    assert {r["outcome"] for r in judge_pairs(wide, PAIRS)} == {"tie"}


@pytest.mark.usefixtures("one_thread")
def test_logit_judge_through_the_cli(in_tmp, capsys, tiny_chat_dir):
    generation_file("a.jsonl", [p.a for p in PAIRS], "a")
    generation_file("b.jsonl", [p.b for p in PAIRS], "b")
    s = judge_cli(capsys, "a.jsonl", "b.jsonl", "--judge", f"hf:{tiny_chat_dir}")
    assert s["judge_kind"] == "LogitJudge" and s["overall"]["pairs"] == 5 and s["overall"]["unparsable"] == 0
    assert set(s["overall"]["margin"]) == {"first_shown_advantage", "mean_preference_for_a", "debiased_win_rate",
                                           "debiased_ci"}
    assert 0 <= s["overall"]["win_rate"] <= 1 and s["overall"]["ci"][0] <= s["overall"]["ci"][1]


@pytest.mark.usefixtures("one_thread")
def test_reward_model_judge_is_order_free(tiny_rm_dir):
    judge = judge_from_spec(f"rm:{tiny_rm_dir}", batch_size=2)
    assert isinstance(judge, RewardModelJudge)
    records = judge_pairs(judge, PAIRS)
    for p, r in zip(PAIRS, records):
        alone_a, alone_b = (RewardModelJudge(str(tiny_rm_dir), batch_size=1).score([(p.prompt, x)])[0]
                            for x in (p.a, p.b))
        assert r["margin_a_first"] == pytest.approx(alone_a - alone_b, abs=1e-4)  # batching and padding change nothing
        assert r["margin_b_first"] == pytest.approx(-r["margin_a_first"])
        assert r["outcome"] == ("win" if alone_a > alone_b else "loss")
    s = summarize_verdicts(records, resamples=100)
    assert s["order_agreement"] == 1.0 and s["position_bias"] == 0.5 and s["ties"] == 0
    assert s["margin"]["first_shown_advantage"] == pytest.approx(0.0, abs=1e-5)


def test_reward_model_must_have_one_output(tmp_path):
    tok = tiny_tokenizer()
    LlamaForSequenceClassification(tiny_config(tok, num_labels=2)).save_pretrained(tmp_path / "two")
    tok.save_pretrained(tmp_path / "two")
    with pytest.raises(InputError, match="num_labels=2"):
        judge_from_spec(f"rm:{tmp_path / 'two'}")


def test_an_endpoint_that_keeps_failing_is_one_line_and_no_output(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    generation_file("a.jsonl", ["x"] * 2, "a")
    generation_file("b.jsonl", ["y"] * 2, "b")
    with ChatServer(statuses=(503,) * 20) as server:
        with pytest.raises(SystemExit) as exit_:
            main(["judge", "a.jsonl", "b.jsonl", "--judge", f"openai:{server.base_url}@m#JUDGE_KEY", "--retries", "0",
                  "--workers", "1", "--out", "judged"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the judge failed" in err[0] and "HTTP 503" in err[0] and KEY not in err[0]
    assert not Path("judged").exists()
