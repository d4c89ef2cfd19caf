"""Per-example probe trajectories on disk: one parquet file per evaluation step, written atomically by rank 0.

A run's trajectory is ``RUN_DIR/probes/trajectory/step_XXXXXXXX.parquet``; each file holds one row per
(split, probe type, probe example) with every per-example metric. One file per step means a resumed run that
evaluates a step again replaces that step's file instead of appending a duplicate (the paper's result files
interleaved restarted runs).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dynlab.errors import InputError

TRAJECTORY_DIR = Path("probes") / "trajectory"
DYNAMICS_DIR = Path("probes") / "dynamics"  # DynamicsCallback's gradient-similarity matrices
KEY_COLUMNS = ("step", "split", "type", "row")


def records_from_results(split: str, results: Mapping[str, Mapping[str, Sequence[float]]]) -> list[dict]:
    """``{type: {metric: (rows,), "row": (rows,)}}`` of one split -> one flat record per (type, row)."""
    records = []
    for ptype, values in results.items():
        metrics = {m: [float(x) for x in v] for m, v in values.items() if m != "row"}
        for i, row in enumerate(values["row"]):
            records.append({"split": split, "type": ptype, "row": int(row), **{m: v[i] for m, v in metrics.items()}})
    return records


def write_step(run_dir: str | os.PathLike, step: int, records: Iterable[dict]) -> Path:
    """Write (or replace) the trajectory file of ``step``; the rename makes it appear whole or not at all."""
    return _write_frame(run_dir, step, pd.DataFrame([{"step": step, **r} for r in records]))


def add_step_columns(run_dir: str | os.PathLike, step: int, records: Iterable[dict]) -> Path:
    """Add (or replace) columns of ``step``'s trajectory file for the (split, type, row) keys in ``records``: rows
    not in ``records`` get NaN there, keys not yet in the file are added. Used for values known only later
    (``DynamicsCallback``'s observed change over the following step)."""
    path = Path(run_dir) / TRAJECTORY_DIR / f"step_{step:08d}.parquet"
    extra = pd.DataFrame([{"step": step, **r} for r in records])
    if not path.exists():
        return _write_frame(run_dir, step, extra)
    frame = pd.read_parquet(path)
    if frame.empty:
        return _write_frame(run_dir, step, extra)
    new_columns = [c for c in extra.columns if c not in KEY_COLUMNS]
    frame = frame.drop(columns=[c for c in new_columns if c in frame.columns])
    return _write_frame(run_dir, step, frame.merge(extra, on=list(KEY_COLUMNS), how="outer"))


def _write_frame(run_dir: str | os.PathLike, step: int, frame: pd.DataFrame) -> Path:
    out_dir = Path(run_dir) / TRAJECTORY_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    if not frame.empty:
        frame = frame.sort_values(list(KEY_COLUMNS[1:]), kind="stable").reset_index(drop=True)
    path = out_dir / f"step_{step:08d}.parquet"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".step-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_trajectory(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every evaluation of a run, one row per (step, split, type, row), sorted; empty if the run has none."""
    files = sorted((Path(run_dir) / TRAJECTORY_DIR).glob("step_*.parquet"))
    # a step that scored no probe rows is an empty file without columns: it adds nothing (and would break the sort)
    frames = [frame for frame in map(pd.read_parquet, files) if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=list(KEY_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(list(KEY_COLUMNS), kind="stable").reset_index(drop=True)


TOKENS_DIR = Path("tokens")  # per-token views of the first probe_token_examples probe rows
TOKEN_KEY_COLUMNS = ("step", "split", "row", "type")
_TOKEN_LISTS = {"token_ids": pa.list_(pa.int32()), "tokens": pa.list_(pa.string()), "logp": pa.list_(pa.float32()),
                "dlogp": pa.list_(pa.float32()), "reward": pa.list_(pa.float32())}


def write_tokens(run_dir: str | os.PathLike, step: int, rows: Iterable[Mapping]) -> Path:
    """Write (or replace) ``RUN_DIR/tokens/step_XXXXXXXX.parquet``: one row per (split, probe row, type) with the
    per-token lists ``token_ids``, ``tokens``, ``logp``, ``dlogp`` (and ``reward``), float32 as computed (a list is
    null where its values are unknown); atomic, like the trajectory files."""
    frame = pd.DataFrame([{**r, "step": step} for r in rows])
    out_dir = Path(run_dir) / TOKENS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = [pa.field("step", pa.int64()), pa.field("split", pa.string()), pa.field("row", pa.int64()),
              pa.field("type", pa.string())]
    if not frame.empty:
        frame = frame.sort_values(["split", "row", "type"], kind="stable").reset_index(drop=True)
        fields += [pa.field(c, t) for c, t in _TOKEN_LISTS.items() if c in frame.columns]
    schema = pa.schema(fields)
    table = pa.Table.from_pandas(frame.reindex(columns=schema.names), schema=schema, preserve_index=False)
    path = out_dir / f"step_{step:08d}.parquet"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".step-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_tokens(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every evaluation's per-token views (``write_tokens``), one row per (step, split, row, type), sorted; each
    per-token column holds a list (a numpy array) per row. Empty if the run kept none."""
    files = sorted((Path(run_dir) / TOKENS_DIR).glob("step_*.parquet"))
    frames = [frame for frame in map(pd.read_parquet, files) if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=list(TOKEN_KEY_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(list(TOKEN_KEY_COLUMNS), kind="stable").reset_index(drop=True)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Write rows as JSON lines atomically (a temporary file renamed into place)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # what load_rows reads, whatever the locale
            for row in rows:
                f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:  # a row that cannot be written leaves neither a partial file nor the temporary one
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def write_table(path: str | os.PathLike, rows: Sequence[Mapping]) -> Path:
    """Write rows as ``.jsonl`` or ``.parquet`` (by the extension), atomically; another extension is an InputError."""
    out = Path(path)
    if out.suffix == ".jsonl":
        return write_jsonl(out, rows)
    if out.suffix != ".parquet":
        raise InputError(f"{out.name}: the table is written as .jsonl or .parquet, not {out.suffix or 'no extension'}",
                         field="--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pandas(pd.DataFrame([dict(r) for r in rows]), preserve_index=False), tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def write_probe_set(run_dir: str | os.PathLike, split: str, rows: Sequence[Mapping[str, str]]) -> Path:
    """The exact probe texts a run scored, in the paper's probe jsonl format (``probes/probe_{split}.jsonl``)."""
    return write_jsonl(Path(run_dir) / "probes" / f"probe_{split}.jsonl", rows)
