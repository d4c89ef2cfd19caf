"""Pairwise judging of two sets of responses, each pair shown in both orders, with a bootstrap win rate: judges are
an OpenAI-compatible chat endpoint, a local chat model (next-token logits of "A" against "B"), or a reward model."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dynlab.chat import ChatBackend, ChatEndpoint, backend_from_spec
from dynlab.errors import InputError

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "loss", "tie"]
SCORES: dict[str, float] = {"win": 1.0, "tie": 0.5, "loss": 0.0}

JUDGE_SYSTEM = "You are a careful, impartial judge of chatbot responses."
# the paper's question (PAPER_NOTES §7), with an explicit tie and a one-word answer
JUDGE_PROMPT = ("For the following query to a chatbot, which response is more helpful?\n\n"
                "Query: {prompt}\n\nResponse A: {first}\n\nResponse B: {second}\n\n"
                "Which response is more helpful? {answer}")
ANSWER_WITH_TIE = 'Answer with one word: "A", "B", or "tie" if they are equally helpful.'
ANSWER_AB = 'Answer with one letter: "A" or "B".'


@dataclass
class Judgement:
    """One judge call on (prompt, first shown, second shown).

    Args:
        verdict: "A" (the first shown is better), "B", "tie", or None when the reply could not be parsed (counted
            as a tie and reported).
        reply: the judge's text (chat judges).
        margin: first minus second: log-prob of "A" minus "B" (logit judge) or reward difference (reward model).
    """

    verdict: Verdict | None
    reply: str | None = None
    margin: float | None = None


def display_prompt(prompt: str) -> str:
    """An HH prompt (``"\\n\\nHuman: q\\n\\nAssistant:"``) shown to a judge: the question alone for one turn, the
    transcript without the open assistant turn for several; other prompts (chat-template text) as they are."""
    text = prompt.strip()
    if text.startswith("Human:") and text.endswith("Assistant:"):
        text = text[: -len("Assistant:")].strip()
        if "\n\nAssistant:" not in text:
            return text.removeprefix("Human:").strip()
    return text


def judge_messages(prompt: str, first: str, second: str, allow_tie: bool = True) -> list[dict[str, str]]:
    """The chat messages asking which of two responses is more helpful (``first`` is shown as Response A)."""
    answer = ANSWER_WITH_TIE if allow_tie else ANSWER_AB
    user = JUDGE_PROMPT.format(prompt=display_prompt(prompt), first=first.strip(), second=second.strip(),
                               answer=answer)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_ONLY_LETTER = re.compile(r"[\W_]*(?:(?:response|answer|output)\s+)?([AB])\b[\W_]*", re.I)
_NAMED = re.compile(r"\b(?:response|answer|output|more helpful|verdict)\s*:?\s*\(?\s*((?-i:[AB]))\b", re.I)
_TIE = re.compile(r"\b(tie|equal(?:ly)?|both|neither|same)\b", re.I)


def parse_verdict(reply: str) -> Verdict | None:
    """Read "A", "B" or a tie from a judge's reply; None when it names neither or both responses.

    >>> [parse_verdict(r) for r in ("A", " b.", "Response B", "**Tie**", "More helpful: A", "I cannot say")]
    ['A', 'B', 'B', 'tie', 'A', None]
    """
    text = reply.strip()
    lines = [x for x in text.splitlines() if x.strip()]
    for candidate in (text, lines[0] if lines else "", lines[-1] if lines else ""):
        if m := _ONLY_LETTER.fullmatch(candidate.strip()):
            return m.group(1).upper()  # type: ignore[return-value]
    named = {m.upper() for m in _NAMED.findall(text)}
    if len(named) == 1:
        return named.pop()  # type: ignore[return-value]
    if _TIE.search(text) and not named:
        return "tie"
    return None


# --- judges ---------------------------------------------------------------------------------------------------------


def reward_text(tokenizer: Any, prompt: str, response: str) -> str:
    """The text a reward model scores for (prompt, response): the tokenizer's chat template of (user: prompt,
    assistant: response) when it has one, else the two concatenated (HH style). Training (``dynlab reward-model``)
    and scoring (:class:`RewardModelJudge`) both use it, so their inputs match."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": display_prompt(prompt)}, {"role": "assistant", "content": response}],
            tokenize=False)
    return prompt + response


class ChatJudge:
    """A chat backend asked in words (temperature 0); the reply is parsed by :func:`parse_verdict`.

    Args:
        backend: e.g. a :class:`dynlab.chat.ChatEndpoint`.
        max_tokens: reply length limit.
        workers: concurrent requests.
    """

    def __init__(self, backend: ChatBackend, max_tokens: int = 16, workers: int = 4):
        self.backend, self.max_tokens, self.workers = backend, max_tokens, workers

    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        def one(item: tuple[str, str, str]) -> Judgement:
            reply = self.backend.complete(judge_messages(*item), temperature=0.0, max_tokens=self.max_tokens)
            return Judgement(parse_verdict(reply), reply=reply)

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(one, items))


class LogitJudge:
    """A local chat model as judge, read from its next-token distribution after the judge prompt (chat template,
    generation prompt added): margin = log p("A") − log p("B") (each the log-sum-exp over the single-token
    spellings "A" and " A"); the verdict is the larger, a tie within ``tie_margin`` nats. Deterministic, and never
    unparsable, unlike free generation from a small model.

    Args:
        name_or_path: anything :class:`dynlab.models.load.ModelSpec` accepts, or a run directory (its export).
        tie_margin: |margin| at or below this is a tie.
        batch_size: judge prompts per forward (left padding).
    """

    def __init__(self, name_or_path: str, tie_margin: float = 0.0, batch_size: int = 8):
        from dynlab.chat import LocalChatModel
        from dynlab.evaluation.generation import resolve_model

        self.chat = LocalChatModel(resolve_model(name_or_path))
        self.tie_margin, self.batch_size = tie_margin, batch_size
        tok = self.chat.tokenizer
        self.letter_ids = {}
        for letter in ("A", "B"):
            ids = {tok(s, add_special_tokens=False)["input_ids"][0] for s in (letter, " " + letter)
                   if len(tok(s, add_special_tokens=False)["input_ids"]) == 1}
            if not ids:
                raise InputError(f"the judge's tokenizer has no single token for {letter!r}", field="judge")
            self.letter_ids[letter] = sorted(ids)

    @torch.no_grad()
    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        model, tok = self.chat.model, self.chat.tokenizer
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        prompts = [self.chat.render(judge_messages(*item, allow_tie=False)) for item in items]
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):  # left padding: the next token of every row is at the last position
                ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1]  # (B, V)
            logp = torch.log_softmax(logits.float(), dim=-1)
            a = torch.logsumexp(logp[:, self.letter_ids["A"]], dim=-1)
            b = torch.logsumexp(logp[:, self.letter_ids["B"]], dim=-1)
            for margin in (a - b).tolist():
                out.append(Judgement(_by_margin(margin, self.tie_margin), margin=margin))
        return out


class RewardModelJudge:
    """A sequence-classification reward model (one output) scores each (prompt, response) on its own; the verdict
    is the higher score, a tie within ``tie_margin``. Being order-free, it has no position bias by construction.

    The text scored is the tokenizer's chat template of (user: prompt, assistant: response) when it has one, else
    the prompt and response concatenated (HH style).

    Args:
        path: an HF directory of an ``AutoModelForSequenceClassification`` with ``num_labels == 1``.
        tie_margin: |score difference| at or below this is a tie.
        batch_size: texts per forward.
    """

    def __init__(self, path: str, tie_margin: float = 0.0, batch_size: int = 8):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise InputError("rm:PATH needs a local HF directory of a sequence-classification reward model",
                             file=path, field="judge")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load a sequence-classification model: {str(err).splitlines()[0]}",
                             file=path, field="judge") from err
        if self.model.config.num_labels != 1:
            raise InputError(f"a reward model has one output; this one has num_labels={self.model.config.num_labels}",
                             file=path, field="judge")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tie_margin, self.batch_size = tie_margin, batch_size
        self._scores: dict[tuple[str, str], float] = {}

    def text(self, prompt: str, response: str) -> str:
        return reward_text(self.tokenizer, prompt, response)

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Rewards of (prompt, response) pairs, each computed once and cached."""
        todo = list(dict.fromkeys(p for p in pairs if p not in self._scores))
        device = next(self.model.parameters()).device
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            enc = self.tokenizer([self.text(*p) for p in chunk], return_tensors="pt", padding=True, truncation=True)
            rewards = self.model(**enc.to(device)).logits[:, 0].float().tolist()  # (B,)
            self._scores.update(zip(chunk, rewards))
        return [self._scores[p] for p in pairs]

    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        first = self.score([(p, a) for p, a, _ in items])
        second = self.score([(p, b) for p, _, b in items])
        return [Judgement(_by_margin(x - y, self.tie_margin), margin=x - y) for x, y in zip(first, second)]


Judge = ChatJudge | LogitJudge | RewardModelJudge


def _by_margin(margin: float, tie_margin: float) -> Verdict:
    if abs(margin) <= tie_margin:
        return "tie"
    return "A" if margin > 0 else "B"


JUDGE_SPECS = "openai:BASE_URL@MODEL[#API_KEY_ENV], hf:PATH (a local chat model) or rm:PATH (a reward model)"


def judge_from_spec(spec: str, *, tie_margin: float = 0.0, batch_size: int = 8, max_tokens: int = 16,
                    workers: int = 4, timeout: float = 60.0, retries: int = 3) -> Judge:
    """A judge from ``openai:BASE_URL@MODEL[#API_KEY_ENV]``, ``hf:PATH`` or ``rm:PATH`` (see the classes)."""
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        backend = backend_from_spec(spec)
        assert isinstance(backend, ChatEndpoint)
        backend.timeout, backend.retries = timeout, retries
        return ChatJudge(backend, max_tokens=max_tokens, workers=workers)
    if kind == "hf" and rest:
        return LogitJudge(rest, tie_margin=tie_margin, batch_size=batch_size)
    if kind == "rm" and rest:
        from dynlab.evaluation.generation import resolve_model

        return RewardModelJudge(resolve_model(rest), tie_margin=tie_margin, batch_size=batch_size)
    raise InputError(f"expected {JUDGE_SPECS}", field="judge")


# --- responses and pairs --------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """The two responses to compare for one prompt (and mode and sample)."""

    prompt: str
    a: str
    b: str
    prompt_index: int
    sample_index: int
    mode: str | None


def read_responses(source: str) -> tuple[list[dict], str]:
    """Responses from ``FILE.jsonl`` (a ``dynlab generate`` file: field ``response``) or ``FILE.jsonl:FIELD`` (any
    jsonl with ``prompt`` and FIELD, e.g. ``probe_test.jsonl:chosen``). Returns rows ``{prompt, response,
    prompt_index, sample_index, mode, row}`` and the model recorded in the file's settings (or None).
    """
    from dynlab.evaluation.generation import _jsonl

    path, _, field = source.rpartition(":")
    if not path or not Path(path).is_file() or not field or "/" in field:
        path, field = source, "response"
    rows, model = [], None
    for number, raw in _jsonl(path):
        if not isinstance(raw, dict):
            raise InputError("row is not a JSON object", file=path, row=number)
        for key in ("prompt", field):
            if not isinstance(raw.get(key), str):
                raise InputError("missing field or not a string" + (" (pass FILE:FIELD to judge another field)"
                                                                    if key == "response" else ""),
                                 file=path, row=number, field=key)
        model = model or (raw.get("settings") or {}).get("model")
        rows.append({"prompt": raw["prompt"], "response": raw[field], "row": number,
                     "prompt_index": int(raw.get("prompt_index", len(rows))),
                     "sample_index": int(raw.get("sample_index", 0)), "mode": raw.get("mode")})
    if not rows:
        raise InputError("no responses", file=path)
    return rows, model


def pair_responses(a_rows: Sequence[dict], b_rows: Sequence[dict], a_file: str, b_file: str) -> list[Pair]:
    """Match A and B rows on (prompt, mode, sample index); the two files must hold the same keys."""
    def keyed(rows: Sequence[dict], file: str) -> dict[tuple, dict]:
        out: dict[tuple, dict] = {}
        for r in rows:
            key = (r["prompt"], r["mode"], r["sample_index"])
            if key in out:
                raise InputError(f"a second response for the same prompt, mode {r['mode']!r} and sample_index "
                                 f"{r['sample_index']} (first at row {out[key]['row']})", file=file, row=r["row"])
            out[key] = r
        return out

    a, b = keyed(a_rows, a_file), keyed(b_rows, b_file)
    for mine, theirs, file, other in ((a, b, a_file, b_file), (b, a, b_file, a_file)):
        missing = [k for k in mine if k not in theirs]
        if missing:
            r = mine[missing[0]]
            raise InputError(f"{len(missing)} prompt/sample(s) have no match in {other} (this one: prompt "
                             f"{r['prompt'][:60]!r}, mode {r['mode']!r}, sample {r['sample_index']}); generate both "
                             "from the same --prompts with the same --num-samples", file=file, row=r["row"])
    return [Pair(k[0], a[k]["response"], b[k]["response"], a[k]["prompt_index"], k[2], k[1]) for k in a]


# --- statistics -----------------------------------------------------------------------------------------------------


def combine_orders(a_first: Verdict | None, b_first: Verdict | None) -> Outcome:
    """One outcome for model A from the verdicts of both presentation orders: a win (loss) only when both orders
    prefer A (B); a tie, an unparsable reply, or orders that disagree give a tie.

    >>> combine_orders("A", "B"), combine_orders("A", "A"), combine_orders("B", "A"), combine_orders("A", "tie")
    ('win', 'tie', 'loss', 'tie')
    """
    first = {"A": "win", "B": "loss"}.get(a_first or "tie", "tie")  # A was shown first
    second = {"B": "win", "A": "loss"}.get(b_first or "tie", "tie")  # B was shown first
    return first if first == second else "tie"  # type: ignore[return-value]


def bootstrap_ci(scores: Sequence[float], groups: Sequence[Hashable] | None = None, *, resamples: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean score, resampling whole groups (prompts) with replacement.

    Args:
        scores: per-pair scores (1 win, 0.5 tie, 0 loss).
        groups: the prompt of each score; several samples of one prompt are resampled together (default: each
            score its own group).
        resamples: bootstrap resamples.
        level: coverage of the interval.
        seed: RNG seed (the same inputs and seed give the same interval).
    """
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    first_seen: dict[Hashable, int] = {}  # group ids by first appearance: the same on every run (not hash order)
    index = np.arange(len(values)) if groups is None else np.array([first_seen.setdefault(g, len(first_seen))
                                                                      for g in groups])
    sums, counts = np.bincount(index, values), np.bincount(index).astype(float)
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))  # (R, G)
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def win_rate(outcomes: Sequence[str]) -> float:
    """(wins + ties / 2) / n; NaN for no outcomes.

    >>> win_rate(["win", "tie", "loss", "win"])
    0.625
    """
    return sum(SCORES[o] for o in outcomes) / len(outcomes) if outcomes else math.nan


def summarize_verdicts(records: Sequence[dict], *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Win rate of A with its bootstrap CI over prompts, counts, position bias and agreement between orders.

    ``records`` are the per-pair rows of :func:`judge_pairs`. ``position_bias`` is the fraction of decisive
    single-order verdicts that picked the response shown first (0.5 = unbiased). For judges with a margin, the
    ``margin`` block also gives the first-shown advantage (mean of the two orders' first-minus-second margins) and
    the win rate of the order-averaged preference (margin_a_first − margin_b_first) / 2, in which a constant
    position advantage cancels.
    """
    outcomes = [r["outcome"] for r in records]
    groups = [r["prompt"] for r in records]
    counts = Counter(outcomes)
    verdicts = [v for r in records for v in (r["verdict_a_first"], r["verdict_b_first"])]
    decisive = [v for v in verdicts if v in ("A", "B")]
    out: dict[str, Any] = {
        "pairs": len(records), "prompts": len(set(groups)),
        "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
        "win_rate": win_rate(outcomes),
        "ci": list(bootstrap_ci([SCORES[o] for o in outcomes], groups, resamples=resamples, seed=seed)),
        "win_rate_a_first": win_rate([{"A": "win", "B": "loss"}.get(r["verdict_a_first"] or "", "tie")
                                      for r in records]),
        "win_rate_b_first": win_rate([{"B": "win", "A": "loss"}.get(r["verdict_b_first"] or "", "tie")
                                      for r in records]),
        "position_bias": decisive.count("A") / len(decisive) if decisive else math.nan,
        "order_agreement": (sum(_same(r) for r in records) / len(records)) if records else math.nan,
        "unparsable": sum(v is None for v in verdicts),
        "judge_calls": len(verdicts),
    }
    margins = [(r["margin_a_first"], r["margin_b_first"]) for r in records]
    if records and all(m1 is not None and m2 is not None for m1, m2 in margins):
        preference = [(m1 - m2) / 2 for m1, m2 in margins]
        debiased = ["win" if p > 0 else "loss" if p < 0 else "tie" for p in preference]
        out["margin"] = {
            "first_shown_advantage": float(np.mean([(m1 + m2) / 2 for m1, m2 in margins])),
            "mean_preference_for_a": float(np.mean(preference)),
            "debiased_win_rate": win_rate(debiased),
            "debiased_ci": list(bootstrap_ci([SCORES[o] for o in debiased], groups, resamples=resamples, seed=seed)),
        }
    return out


def _same(record: dict) -> bool:
    """Both orders name the same model (or both a tie)."""
    first = {"A": "a", "B": "b"}.get(record["verdict_a_first"] or "", "tie")
    second = {"B": "a", "A": "b"}.get(record["verdict_b_first"] or "", "tie")
    return first == second


def judge_pairs(judge: Any, pairs: Sequence[Pair], max_chars: int | None = 2000) -> list[dict]:
    """Ask ``judge`` about every pair in both orders (A first, then B first); one record per pair.

    Responses longer than ``max_chars`` are cut to it for the judge (the paper skipped such pairs instead).
    """
    def cut(text: str) -> str:
        return text if max_chars is None or len(text) <= max_chars else text[:max_chars] + " …"

    items = [(p.prompt, cut(p.a), cut(p.b)) for p in pairs]
    results = judge.judge(items + [(prompt, b, a) for prompt, a, b in items])
    n = len(pairs)
    records = []
    for p, one, two in zip(pairs, results[:n], results[n:]):
        records.append({
            "prompt_index": p.prompt_index, "sample_index": p.sample_index, "mode": p.mode, "prompt": p.prompt,
            "response_a": p.a, "response_b": p.b,
            "verdict_a_first": one.verdict, "verdict_b_first": two.verdict,
            "outcome": combine_orders(one.verdict, two.verdict),
            "reply_a_first": one.reply, "reply_b_first": two.reply,
            "margin_a_first": one.margin, "margin_b_first": two.margin,
        })
    return records


def summary_markdown(summary: dict[str, Any]) -> str:
    """The judge summary as a markdown table (overall and per generation mode)."""
    head = ("| | pairs | prompts | A wins | B wins | ties | A win rate | 95% CI | A first / B first | "
            "position bias | order agreement | unparsable |")
    lines = [f"A = {summary['a']['label']}  \nB = {summary['b']['label']}  \njudge = {summary['judge']}", "",
             head, "|" + "---|" * 12]
    for name, s in [("all", summary["overall"]), *summary.get("by_mode", {}).items()]:
        lines.append(f"| {name} | {s['pairs']} | {s['prompts']} | {s['wins']} | {s['losses']} | {s['ties']} | "
                     f"{s['win_rate']:.3f} | [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | "
                     f"{s['win_rate_a_first']:.3f} / {s['win_rate_b_first']:.3f} | {s['position_bias']:.3f} | "
                     f"{s['order_agreement']:.3f} | {s['unparsable']}/{s['judge_calls']} |")
    if "margin" in summary["overall"]:
        m = summary["overall"]["margin"]
        lines += ["", f"Margins (first minus second shown): first-shown advantage {m['first_shown_advantage']:+.3f}; "
                      f"order-averaged preference for A {m['mean_preference_for_a']:+.3f}; its win rate "
                      f"{m['debiased_win_rate']:.3f} [{m['debiased_ci'][0]:.3f}, {m['debiased_ci'][1]:.3f}]"]
    lines += ["", "A win rate = (A wins + ties/2) / pairs, each pair judged in both orders (a win needs both); "
                  "95% CI: percentile bootstrap over prompts. Position bias: share of decisive single-order verdicts "
                  "that chose the response shown first (0.5 = none)."]
    return "\n".join(lines)
