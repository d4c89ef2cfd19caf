"""One error type for bad user input: it names the file, row and field, and the CLI prints it as one line; and
:func:`redact`, which takes credentials out of any text a user or a log will see."""

from __future__ import annotations

import re

_SECRETS = (  # (pattern, replacement): the secret goes, what says where it was stays
    (re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/?#@\s]+@", re.I), r"\1***@"),  # https://user:KEY@host: the userinfo
    (re.compile(r"\b(authorization[\"']?\s*[:=]\s*[\"']?(?:basic\s+|bearer\s+|token\s+)?)[^\s\"',;]+", re.I),
     r"\1***"),  # a header as printed
    (re.compile(r"\b(Bearer\s+)[\w.~+/-]{8,}=*"), r"\1***"),
    (re.compile(r"\bsk-[\w-]{8,}"), "sk-***"),  # OpenAI/Anthropic-style keys: sk-..., sk-proj-..., sk-ant-...
    (re.compile(r"\b(hf_|gh[pousr]_|xox[abpr]-)[\w-]{16,}"), r"\1***"),  # Hugging Face, GitHub, Slack tokens
    (re.compile(r"\b((?:api[_-]?)?key|(?:access[_-]?|auth[_-]?)?token|secret|password|passwd)=[^\s&#\"',;]+", re.I),
     r"\1=***"),  # ?api_key=..., token=..., password=... (query strings, key=value text)
)


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***``: a URL's userinfo, ``Authorization`` and ``Bearer`` values, keys
    that look like ``sk-...``/``hf_...``/``ghp_...``, and ``api_key=``/``token=``/``password=`` values.

    >>> redact("https://user:KEY@example.org/v1?api_key=abc&x=1 failed, Authorization: Bearer sk-0123456789abcdef")
    'https://***@example.org/v1?api_key=***&x=1 failed, Authorization: Bearer ***'
    """
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class InputError(ValueError):
    """Bad input a person can fix. ``str(err)`` is one line: ``FILE: row N: field 'F': message``, with any
    credential in it replaced by ``***`` (:func:`redact`).

    Args:
        message: what is wrong, and the fix when there is one.
        file: the file (or dataset id) the bad value came from.
        row: 1-based row (line for jsonl) in that file.
        field: the field name.
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        message, file, field = (redact(x) if x is not None else None for x in (message, file, field))
        self.message, self.file, self.row, self.field = message, file, row, field
        parts = [p for p in (file, f"row {row}" if row is not None else None,
                             f"field '{field}'" if field is not None else None) if p]
        super().__init__(": ".join([*parts, message]).replace("\n", " "))
