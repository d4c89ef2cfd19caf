"""Read an offline W&B run back: the ``.wandb`` file is a LevelDB-style log of protobuf ``Record`` messages
(wandb's own transaction log; ``wandb sync`` uploads it later). Used by the tests and handy for checking a run
before syncing it."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEADER = b":W&B"
_BLOCK = 32768  # the log is written in 32 KiB blocks; a record never straddles a block without being split
_RECORD_HEADER = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | os.PathLike) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(_HEADER):
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = 7, b""
    while pos + _RECORD_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEADER:  # zero padding at the end of a block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        pos += _RECORD_HEADER
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 0:  # padding
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        else:
            pending = chunk if kind == _FIRST else pending + chunk


def read_offline_run(path: str | os.PathLike) -> dict[str, Any]:
    """``{"history": [{key: value}], "config": {key: value}, "summary": {key: value}}`` of one offline run
    (``path``: the ``.wandb`` file or the ``offline-run-*`` directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = next(path.glob("*.wandb"))
    history, config, summary = [], {}, {}
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind in ("config", "run"):  # the initial config rides on the run record, later updates on their own
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({_key(item): json.loads(item.value_json) for item in updates})
        elif kind == "summary":
            summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
    return {"history": history, "config": config, "summary": summary}


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)
