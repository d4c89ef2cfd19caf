"""Turn any preference source (HH strings, chat message lists, flat rows, the paper's probe jsonl) into rows
``{"prompt", "chosen", "rejected", ...probe types}`` of plain text, failing early on bad input with file, row and field.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from dynlab.chat import HH_ASSISTANT, default_render_chat
from dynlab.errors import InputError

Format = Literal["auto", "hh", "chat", "flat", "probe"]

PROBE_FILE_TYPES: tuple[str, ...] = (
    "chosen", "chosen_initial", "chosen_gptsemantic", "chosen_gptformat",
    "rejected", "reject_gptsemantic", "reject_gptformat",
    "irr_train", "irr_test", "irr_hum", "random_permute", "random_nonhum",
)  # the paper's probe keys it evaluates; its files also hold ``chosen_selfr``, which is dropped

_EXTRA_PROBE_KEYS = tuple(k for k in PROBE_FILE_TYPES if k not in ("chosen", "rejected"))
_ROLES = ("system", "user", "assistant")
_FORMATS = ("auto", "hh", "chat", "flat", "probe")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
_HUB_PROBE_TIMEOUT_S = 3.0
_PARQUET_MAGIC, _GZIP_MAGIC = b"PAR1", b"\x1f\x8b"


def split_hh(text: str) -> tuple[str, str]:
    """Split an HH transcript into (prompt, response) at its last ``"\\n\\nAssistant:"``.

    The prompt keeps the marker; the response is the rest, leading space included.

    >>> split_hh("\\n\\nHuman: Hi\\n\\nAssistant: Hello.")
    ('\\n\\nHuman: Hi\\n\\nAssistant:', ' Hello.')
    """
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise InputError(f"no {HH_ASSISTANT!r} marker, so the prompt cannot be split from the response")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def parse_row(
    raw: dict,
    *,
    file: str,
    row: int,
    render_chat: Callable[[list[dict]], str] | None = None,
    format: Format = "auto",
    allow_empty: bool = False,
    require_rejected: bool | None = None,
) -> dict[str, str]:
    """Turn one raw row into ``{"prompt", "chosen", "rejected", ...probe types}`` text.

    Args:
        raw: the row as read (a JSON object).
        file: the file or dataset id, for error messages.
        row: its 1-based row (line number for jsonl), for error messages.
        render_chat: renders the context messages of a chat row into the prompt (the tokenizer's chat template
            with ``add_generation_prompt=True``). ``None`` uses :func:`default_render_chat` and then gives each chat
            response a leading space, as in HH.
        format: ``"auto"`` detects it per row: message lists are ``chat`` (a ``messages`` list without ``chosen``
            is the chosen conversation alone), any probe key other than chosen/rejected is ``probe``, no ``prompt``
            key is ``hh``, else ``flat``.
        allow_empty: keep empty or whitespace-only responses. Probe rows always keep them: the paper's released
            probe file has empty ``chosen_initial`` samples and a blank HH ``rejected`` (scored as EOS only).
        require_rejected: True: a row without a rejected response is an error (DPO), whatever its format. False
            (SFT data, probe sets): such a row (no ``rejected`` key, or a null one) parses without it. ``None``
            (the default): an error except in probe-format rows, which a probe set may leave out. A rejected
            response that is there is always checked.

    Returns:
        The parsed row; probe rows also keep the :data:`PROBE_FILE_TYPES` they have (``chosen_selfr`` and unknown
        keys are dropped). ``rejected`` is absent where the row has none and it is not required.

    Raises:
        InputError: naming file, row and field, for a missing or non-string field, an empty prompt or response, a
            malformed chat message list, or an HH pair whose two prompts differ.
    """
    if not isinstance(raw, dict):
        raise InputError(f"row is not a JSON object but {_kind(raw)}", file=file, row=row)
    if format not in _FORMATS:
        raise InputError(f"unknown format {format!r}; use one of {', '.join(_FORMATS)}", file=file, row=row)
    where = {"file": file, "row": row}
    if require_rejected is False and raw.get("rejected", 0) is None:  # a null in an optional column (parquet, hub)
        raw = {k: v for k, v in raw.items() if k != "rejected"}
    if format == "auto":
        format = _detect_format(raw, where)
    # SFT data may leave out rejected, and so may a probe set (e.g. `dynlab probe build --types chosen irr_hum`);
    # DPO (require_rejected=True) needs it in every row, probe-format rows included
    with_rejected = "rejected" in raw or (format != "probe" if require_rejected is None else require_rejected)
    if format == "hh":
        out = _parse_hh(raw, where, with_rejected)
    elif format == "chat":
        out = _parse_chat(raw, where, render_chat, with_rejected)
    else:
        out = {key: _text(raw, key, where) for key in ("prompt", "chosen", "rejected")[: 3 if with_rejected else 2]}
        if format == "probe":
            out.update({key: _text(raw, key, where) for key in _EXTRA_PROBE_KEYS if key in raw})
    if not out["prompt"].strip():
        raise InputError("the prompt is empty", field="prompt", **where)
    if not (allow_empty or format == "probe"):
        for key in ("chosen", "rejected")[: 2 if with_rejected else 1]:
            if not out[key].strip():
                raise InputError("the response is empty or whitespace-only; drop the row or give it text",
                                 field=key, **where)
    return out


def load_rows(
    source: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    data_dir: str | None = None,
    format: Format = "auto",
    render_chat: Callable[[list[dict]], str] | None = None,
    limit: int | None = None,
    allow_empty: bool = False,
    require_rejected: bool | None = None,
) -> list[dict[str, str]]:
    """Load preference rows from a local file or a Hugging Face hub dataset, each parsed by :func:`parse_row`.

    A source that exists, starts with ``.``, ``/`` or ``~``, has more than one ``/``, or ends with ``.jsonl``,
    ``.json``, ``.parquet`` (``.jsonl.gz``/``.json.gz`` too) is a local file; jsonl is read line by line (blank
    lines skipped) so errors name the line. Parquet and gzip are also recognised by their first bytes, whatever the
    file's name. A repeated key in a JSON object is an error, not a silent last-one-wins. A local directory of data
    files goes to ``datasets.load_dataset`` as is. Anything else is a hub id for
    ``datasets.load_dataset(source, name=config_name, data_dir=data_dir, split=split)``.

    Offline, ``load_dataset`` retries for about 25 s before failing, so unless ``datasets`` is already in offline
    mode (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set before it was imported, where it fails at once or serves
    its cache) the hub endpoint (``huggingface_hub.constants.ENDPOINT``) is first probed with one TCP connection
    and a 3 s timeout; if that fails the load stops at once with an :class:`InputError`.

    Args:
        source: a local file path or a hub dataset id (``"synthetic"`` is built by ``dynlab.data.synthetic``).
        split: the hub dataset split.
        config_name: the hub dataset configuration.
        data_dir: the hub dataset subdirectory (``helpful-base`` for ``Anthropic/hh-rlhf``).
        format: see :func:`parse_row`.
        render_chat: see :func:`parse_row`.
        limit: keep only the first ``limit`` rows.
        allow_empty: see :func:`parse_row`.
        require_rejected: see :func:`parse_row` (True for DPO, False for SFT data: prompt and chosen alone).

    Returns:
        The parsed rows.

    Raises:
        InputError: for a missing or unreadable file, an unreachable hub, or any bad row.
    """
    if source.split(":")[0] == "synthetic":
        raise InputError("the synthetic set is built by dynlab.data.synthetic.make_synthetic, not loaded",
                         file=source)
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}", file=source)
    path = Path(source).expanduser()
    if path.is_dir():
        raws, label = _dir_rows(path, source, split, config_name, data_dir, limit), source
    elif path.exists() or _looks_local(source):
        raws, label = _file_rows(path, source), source
    else:
        raws, label = _hub_rows(source, split, config_name, data_dir, limit), f"{source}[{split}]"
    rows = []
    for number, raw in raws:
        if limit is not None and len(rows) >= limit:
            break
        rows.append(parse_row(raw, file=label, row=number, render_chat=render_chat, format=format,
                              allow_empty=allow_empty, require_rejected=require_rejected))
    return rows


# --- row formats ---------------------------------------------------------------------------------------------------


def _detect_format(raw: dict, where: dict[str, Any]) -> str:
    """The row's format from its fields, or an error naming the field that contradicts the others."""
    chosen, rejected = raw.get("chosen"), raw.get("rejected")
    if isinstance(chosen, list) or ("chosen" not in raw and (isinstance(rejected, list)
                                                             or isinstance(raw.get("messages"), list))):
        return "chat"
    if isinstance(rejected, list):  # the chosen response is not a message list, so this one is the odd field
        raise InputError(f"a list of messages, but 'chosen' is {_kind(chosen)}: give both responses as message "
                         "lists (chat rows) or both as strings", field="rejected", **where)
    probe = any(key in raw for key in _EXTRA_PROBE_KEYS)
    if "prompt" not in raw and not probe:
        texts = [raw[key] for key in ("chosen", "rejected") if key in raw]
        if texts and all(isinstance(t, str) and HH_ASSISTANT not in t for t in texts):  # no HH transcript either
            raise InputError(f"missing field: a flat row needs prompt, chosen and (for DPO) rejected (an HH row has "
                             f"the whole transcript, through its last {HH_ASSISTANT!r}, in chosen and rejected)",
                             field="prompt", **where)
        return "hh"
    return "probe" if probe else "flat"


def _parse_hh(raw: dict, where: dict[str, Any], with_rejected: bool = True) -> dict[str, str]:
    split = {}
    for key in ("chosen", "rejected")[: 2 if with_rejected else 1]:
        text = _text(raw, key, where)
        if HH_ASSISTANT not in text:
            raise InputError(f"HH text has no {HH_ASSISTANT!r} marker; give a 'prompt' field for flat rows",
                             field=key, **where)
        split[key] = split_hh(text)
    if with_rejected and split["chosen"][0] != split["rejected"][0]:
        raise InputError(f"its prompt (text through the last {HH_ASSISTANT!r}) differs from the chosen one's",
                         field="rejected", **where)
    return {"prompt": split["chosen"][0], **{key: response for key, (_, response) in split.items()}}


def _parse_chat(raw: dict, where: dict[str, Any], render_chat: Callable[[list[dict]], str] | None,
                with_rejected: bool = True) -> dict[str, str]:
    """A chat row: ``chosen`` (and ``rejected``) message lists, or one ``messages`` conversation (SFT data) whose
    last, assistant message is the chosen response."""
    contexts, responses = {}, {}
    chosen_key = "messages" if "chosen" not in raw and "messages" in raw else "chosen"
    for name, key in (("chosen", chosen_key), ("rejected", "rejected"))[: 2 if with_rejected else 1]:
        messages = _messages(raw, key, where)
        if messages[-1]["role"] != "assistant":
            raise InputError(f"the last message is from {messages[-1]['role']!r}, not the assistant",
                             field=key, **where)
        contexts[name], responses[name] = messages[:-1], messages[-1]["content"]
    if with_rejected and contexts["chosen"] != contexts["rejected"]:
        raise InputError("the messages before the final assistant reply differ from the chosen ones",
                         field="rejected", **where)
    context = contexts["chosen"]
    if not context:  # only the replies are lists: the prompt is a plain string
        context = [{"role": "user", "content": _text(raw, "prompt", where)}]
    try:
        prompt = (render_chat or default_render_chat)(context)
    except Exception as err:  # a chat template rejects this conversation (e.g. roles that do not alternate)
        raise InputError(f"the chat template cannot render the prompt messages: {err}", field="chosen",
                         **where) from err
    if not isinstance(prompt, str):
        raise InputError(f"render_chat returned {_kind(prompt)}, not a string", field="chosen", **where)
    if render_chat is None:  # HH-style prompt ends with "Assistant:", so the reply continues after a space
        responses = {k: v if v[:1].isspace() else " " + v for k, v in responses.items()}
    return {"prompt": prompt, **responses}


def _messages(raw: dict, key: str, where: dict[str, Any]) -> list[dict[str, str]]:
    value = raw.get(key)
    if value is None and key not in raw:
        raise InputError("missing field", field=key, **where)
    if not isinstance(value, list) or not value:
        raise InputError(f"expected a non-empty list of {{role, content}} messages, got {_kind(value)}",
                         field=key, **where)
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise InputError(f"message {i} is {_kind(message)}, not an object", field=key, **where)
        if message.get("role") not in _ROLES:
            raise InputError(f"message {i} has role {message.get('role')!r}; expected one of {', '.join(_ROLES)}",
                             field=key, **where)
        if not isinstance(message.get("content"), str):
            raise InputError(f"message {i} content is {_kind(message.get('content'))}, not a string",
                             field=key, **where)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(raw: dict, key: str, where: dict[str, Any]) -> str:
    if key not in raw:
        raise InputError("missing field", field=key, **where)
    value = raw[key]
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {_kind(value)}", field=key, **where)
    return value


def _kind(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


# --- sources -------------------------------------------------------------------------------------------------------


def _looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.endswith(_LOCAL_SUFFIXES) or source.count("/") > 1
            or (os.sep != "/" and os.sep in source))


def _file_rows(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    if not path.is_file():
        raise InputError("no such file; give an existing .jsonl/.json/.parquet file or a hub dataset id",
                         file=source)
    name = path.name.lower()
    if name.endswith(".parquet") or _magic(path) == _PARQUET_MAGIC:  # parquet saved under another name too
        return _parquet_rows(path, source)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_rows(path, source)
    if name.endswith((".json", ".json.gz")):
        return _json_rows(path, source)
    raise InputError("unsupported file type; use .jsonl, .json or .parquet", file=source)


def _magic(path: Path) -> bytes:
    """The file's first 4 bytes (none when it cannot be read: the reader then says why)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4)
    except OSError:
        return b""


def _read_text(path: Path, source: str, lines_are_rows: bool) -> Iterator[str]:
    """The file's lines, gunzipped when it is gzip (by its magic bytes, whatever its name)."""
    opener = gzip.open if _magic(path)[:2] == _GZIP_MAGIC else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            yield from handle
    except UnicodeDecodeError as err:  # its position counts from a buffer, not the file: find the line
        line, column = _bad_utf8(path, opener)
        raise InputError(f"not valid UTF-8 (byte {column} of line {line}: {err.reason}); save the file as UTF-8",
                         file=source, row=line if lines_are_rows else None) from None
    except OSError as err:
        raise InputError(f"cannot read the file: {err}", file=source) from err


def _bad_utf8(path: Path, opener: Callable[..., Any]) -> tuple[int, int]:
    """(line, byte in that line), both 1-based, of the first byte that is not UTF-8."""
    with opener(path, "rb") as handle:
        data = handle.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        return data.count(b"\n", 0, err.start) + 1, err.start - line_start + 1
    return 0, 0  # not reached: the text reader failed on the same bytes


class _Duplicated(dict):
    """A JSON object in which ``key`` appeared more than once (``json`` would silently keep the last value)."""

    key: str
    made = 0  # how many were made: rows are searched for one only when this has grown while parsing them


def _object(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` that marks objects with a repeated key, so the error can name the row and the key."""
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    keys = [k for k, _ in pairs]
    marked = _Duplicated(out)
    marked.key = next(k for i, k in enumerate(keys) if k in keys[:i])
    _Duplicated.made += 1
    return marked


def _duplicate_field(value: Any, path: str = "") -> str | None:
    """The path (``chosen[2].role``, list items from 0) of the first repeated key in ``value``, or ``None``."""
    if isinstance(value, _Duplicated):
        return f"{path}.{value.key}" if path else value.key
    if isinstance(value, dict):
        children = [(f"{path}.{k}" if path else k, v) for k, v in value.items()]
    else:
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else []
    return next((found for child_path, child in children if (found := _duplicate_field(child, child_path))), None)


def _check_duplicates(value: Any, source: str, row: int) -> Any:
    field = _duplicate_field(value)
    if field is not None:
        raise InputError("this key appears twice in one JSON object (the last value would win silently); keep one",
                         file=source, row=row, field=field)
    return value


def _jsonl_rows(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(_read_text(path, source, lines_are_rows=True), 1):
        if not line.strip():
            continue
        made = _Duplicated.made
        try:
            raw = json.loads(line, object_pairs_hook=_object)
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON: {err.msg} (column {err.colno})", file=source, row=number) from err
        yield number, raw if _Duplicated.made == made else _check_duplicates(raw, source, number)


def _json_rows(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    text = "".join(_read_text(path, source, lines_are_rows=False))
    made = _Duplicated.made
    try:
        data = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines saved as .json, as hub datasets often are
            return _jsonl_rows(path, source)
        raise InputError(f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})", file=source) from err
    if not isinstance(data, list):
        raise InputError(f"expected a JSON list of row objects, got {_kind(data)}", file=source)
    if _Duplicated.made == made:
        return enumerate(data, 1)
    return ((number, _check_duplicates(raw, source, number)) for number, raw in enumerate(data, 1))


def _parquet_rows(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowException) as err:
        raise InputError(f"cannot read the parquet file: {err}", file=source) from err
    return enumerate(table.to_pylist(), 1)


def _hub_rows(source: str, split: str, config_name: str | None, data_dir: str | None,
              limit: int | None) -> Iterator[tuple[int, Any]]:
    import datasets  # heavy: only for hub sources

    def fail(reason: str) -> InputError:
        return InputError(f"cannot load dataset from the Hugging Face hub (offline?): {reason}; nor is it a local "
                          "file or directory here: download it elsewhere and pass a local .jsonl/.json/.parquet "
                          "file as data.source", file=source)

    if not datasets.config.HF_HUB_OFFLINE:
        reason = _hub_unreachable()
        if reason:
            raise fail(reason)
    try:
        data = datasets.load_dataset(source, name=config_name, data_dir=data_dir, split=split)
    except Exception as err:  # the hub and dataset builders raise many types; all mean "cannot load this source"
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise fail(f"{type(err).__name__}: {first_line[:200]}") from err
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return enumerate(data, 1)


def _dir_rows(path: Path, source: str, split: str, config_name: str | None, data_dir: str | None,
              limit: int | None) -> Iterator[tuple[int, Any]]:
    """A local directory of data files, read by ``datasets.load_dataset`` (each file's rows, then the next's)."""
    import datasets

    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    data_files = [p for p in files if p.name.lower().endswith(_LOCAL_SUFFIXES) or _magic(p) == _PARQUET_MAGIC]
    if not data_files:
        found = ", ".join(str(p.relative_to(path)) for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise InputError(f"a directory with no .jsonl/.json/.parquet data files (it holds {found or 'no files'}); "
                         "pass one data file, or a directory of them", file=source)
    try:
        data = datasets.load_dataset(source, name=config_name, data_dir=data_dir, split=split)
    except Exception as err:  # the dataset builders raise many types; all mean "cannot read this directory"
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise InputError(f"cannot load this local directory with datasets.load_dataset ({type(err).__name__}: "
                         f"{first_line[:200]}); pass one of its data files instead, e.g. {data_files[0]}",
                         file=source) from err
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return enumerate(data, 1)


def _hub_unreachable() -> str | None:
    """Return why the hub endpoint cannot be reached in a few seconds, or ``None`` when it can."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{constants.ENDPOINT} is unreachable ({err})"
    return None
