"""The rephrase probe types from a pluggable chat backend (a local HF model or an OpenAI-compatible endpoint), as
the paper built them with gpt-3.5: a semantic rephrase keeps the meaning, a format rephrase keeps the form."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dynlab.chat import ChatBackend, ChatEndpointError
from dynlab.errors import InputError

log = logging.getLogger(__name__)

INSTRUCTIONS = {
    "semantic": "Rephrase the response below using different words but keeping exactly the same meaning. "
                "Reply with the rephrased response only.",
    "format": "Rewrite the response below keeping its format, length and style, but change what it says to "
              "something different and plausible. Reply with the rewritten response only.",
}
REPHRASE_TYPES = {  # probe type -> (the response it rewrites, how)
    "chosen_gptsemantic": ("chosen", "semantic"),
    "chosen_gptformat": ("chosen", "format"),
    "reject_gptsemantic": ("rejected", "semantic"),
    "reject_gptformat": ("rejected", "format"),
}


def rephrase_messages(text: str, mode: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{INSTRUCTIONS[mode]}\n\nResponse: {text.strip()}"}]


def clean_reply(reply: str) -> str:
    """Strip quotes and a leading label the model may add; keep HH's convention of a leading space."""
    text, previous = reply.strip(), None
    while text != previous:  # the label may sit inside the quotes, or the quotes inside the label
        previous = text
        for label in ("Rephrased response:", "Rewritten response:", "Response:"):
            if text.lower().startswith(label.lower()):
                text = text[len(label):].strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and text[0] not in text[1:-1]:
            text = text[1:-1].strip()  # one quoted reply, not '"a" and "b"'
    return " " + text if text else ""


def add_rephrases(rows: Sequence[dict[str, str]], backend: ChatBackend, types: Sequence[str] = tuple(REPHRASE_TYPES),
                  temperature: float = 0.7, max_tokens: int = 256) -> list[dict[str, str]]:
    """Rows with every rephrase type in ``types`` filled in where missing (existing values are kept).

    Raises:
        InputError: when the backend keeps failing (e.g. an unreachable endpoint), in one line without credentials.
    """
    out = [dict(r) for r in rows]
    for ptype in types:
        source, mode = REPHRASE_TYPES[ptype]
        todo = [r for r in out if ptype not in r]
        conversations = [rephrase_messages(r[source], mode) for r in todo]
        try:
            if hasattr(backend, "complete_many"):  # a local model generates a batch at once
                replies = backend.complete_many(conversations, temperature=temperature, max_tokens=max_tokens)
            else:
                replies = [backend.complete(c, temperature=temperature, max_tokens=max_tokens) for c in conversations]
        except ChatEndpointError as err:  # an endpoint that kept failing: one line, its credentials redacted, no chain
            raise InputError(f"the rephraser failed on {ptype}: {err}", field="rephraser") from None
        for row, reply in zip(todo, replies):
            row[ptype] = clean_reply(reply)
        empty = sum(1 for r in todo if not r[ptype].strip())
        if empty:
            log.warning("%d of %d %s rephrases came back empty (scored as EOS only)", empty, len(todo), ptype)
    return out
