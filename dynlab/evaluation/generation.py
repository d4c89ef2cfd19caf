"""Greedy and seeded sampled responses of a model (a run's export, an HF directory, ``tiny``, the embedded SmolLM2) to
a prompt set (a run's probe split, a probe or preference file, the synthetic set), one jsonl row per response with
the generation settings on every row."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dynlab import __version__
from dynlab.errors import InputError

PROBE_SPLITS = ("train", "test")
# how the shipped configs split the synthetic set (data.num_train, data.num_heldout, data.seed): ``synthetic:test``
# is their held-out rows, whose first probe_size prompts are every run's probe_test
SYNTHETIC_SPLIT = (96, 32, 0)


@dataclass
class GenerationSettings:
    """How a generation file was made; every row of the file carries these as ``settings``.

    Args:
        model: the model as given (``--model``).
        model_path: what was loaded (a run directory resolves to its ``export/``).
        prompts: the prompt source as given.
        max_new_tokens: length limit of each response.
        greedy: one greedy response per prompt (``mode: greedy``).
        num_samples: sampled responses per prompt (``mode: sampled``).
        temperature: sampling temperature.
        top_p: nucleus sampling mass (1 = off).
        seed: base seed; sample ``s`` of a batch starting at prompt ``i`` is drawn with torch seed
            ``seed + s * num_prompts + i`` (the row's ``seed``), so the same settings give the same file.
        batch_size: prompts per generate call (left padding); part of what a seed reproduces.
        max_prompt_length: prompts longer than this (in tokens) keep their end, as in training; None keeps all.
        dtype: parameter dtype of the model.
        num_prompts: prompts in the file.
        dynlab_version: the dynlab that wrote the file.
    """

    model: str
    model_path: str
    prompts: str
    max_new_tokens: int = 64
    greedy: bool = True
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    max_prompt_length: int | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_prompts: int = 0
    dynlab_version: str = field(default=__version__)


def resolve_model(path: str) -> str:
    """A finished run directory stands for its final policy, ``RUN_DIR/export``; anything else is returned as is
    (an HF directory, ``tiny``, ``embedded:smollm2-135m-instruct``, a hub id)."""
    p = Path(path)
    if (p / "export" / "config.json").is_file():
        return str(p / "export")
    if p.is_dir() and (p / "config.yaml").is_file() and not (p / "config.json").is_file():
        raise InputError("a dynlab run directory without export/: the run did not finish; pass its "
                         "checkpoints' run once it has, or an HF directory", file=path, field="model")
    return path


def load_prompts(source: str, tokenizer: Any = None, limit: int | None = None) -> list[str]:
    """The distinct prompts of ``source``, in order (a repeated prompt is kept once).

    Args:
        source: ``RUN_DIR[:train|test]`` (the probe split a run scored, default test), ``synthetic[:train|test]``
            (the embedded set as the shipped configs split it, default test), a probe, preference or prompt-only
            ``.jsonl`` (rows with a ``prompt``; a generation file works too), a ``.json``/``.parquet`` preference
            file, or a hub dataset id (offline: fails at once).
        tokenizer: renders chat-format rows with its chat template when it has one (as training does).
        limit: keep the first ``limit`` prompts.

    Raises:
        InputError: naming the source (and row) when it cannot be read or holds no prompt.
    """
    head, _, split = source.rpartition(":")
    if split not in PROBE_SPLITS:
        head, split = source, "test"
    if head == "synthetic":
        from dynlab.data.synthetic import make_synthetic

        num_train, num_heldout, seed = SYNTHETIC_SPLIT
        rows = make_synthetic(num_train + num_heldout, seed=seed)
        prompts = [r["prompt"] for r in (rows[:num_train] if split == "train" else rows[num_train:])]
    elif Path(head).is_dir() and (Path(head) / "probes").is_dir():
        probe_file = Path(head) / "probes" / f"probe_{split}.jsonl"
        if not probe_file.is_file():
            raise InputError(f"the run has no probes/probe_{split}.jsonl (was probe evaluation on?)", file=head)
        prompts = _file_prompts(str(probe_file), tokenizer)
    elif split != "test" or source.endswith(":test"):
        raise InputError(f"{head!r} is neither a dynlab run directory (with probes/) nor 'synthetic'", file=source)
    else:
        prompts = _file_prompts(source, tokenizer)
    prompts = list(dict.fromkeys(prompts))[:limit]
    if not prompts:
        raise InputError("no prompts", file=source)
    return prompts


def _file_prompts(source: str, tokenizer: Any) -> list[str]:
    from dynlab.data.formats import load_rows, parse_row

    render = None
    if getattr(tokenizer, "chat_template", None):
        def render(messages):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if not source.lower().endswith((".jsonl", ".jsonl.gz")):
        return [r["prompt"] for r in load_rows(source, render_chat=render, allow_empty=True)]
    prompts = []
    for number, raw in _jsonl(source):
        if isinstance(raw, dict) and isinstance(raw.get("prompt"), str) and not isinstance(raw.get("chosen"), list):
            # only the prompt is needed: flat, probe, prompt-only rows and generation files alike
            if not raw["prompt"].strip():
                raise InputError("the prompt is empty", file=source, row=number, field="prompt")
            prompts.append(raw["prompt"])
        else:  # HH transcripts and chat message lists
            prompts.append(parse_row(raw, file=source, row=number, render_chat=render, allow_empty=True)["prompt"])
    return prompts


def _jsonl(source: str) -> list[tuple[int, Any]]:
    import gzip

    path = Path(source)
    if not path.is_file():
        raise InputError("no such file", file=source)
    opener = gzip.open if source.lower().endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append((number, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise InputError(f"not valid JSON: {err.msg} (column {err.colno})", file=source,
                                         row=number) from err
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the file: {err}", file=source) from err
    return rows


def generate_rows(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings) -> list[dict]:
    """One row per (prompt, response): ``prompt_index``, ``sample_index``, ``mode`` (greedy/sampled), ``seed``
    (the torch seed of the row's batch; null for greedy), ``prompt``, ``response`` and ``settings``.

    Prompts are tokenized as in training (special tokens added, the end kept past ``max_prompt_length``) and
    generated in batches with left padding by :func:`dynlab.models.generate.generate_responses`, which stops at
    EOS and cuts at the next ``"\\n\\nHuman:"``.
    """
    from dynlab.data.tokenize import keep_prompt_end
    from dynlab.models.generate import generate_responses

    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if settings.max_prompt_length is not None:
        ids = [keep_prompt_end(tokenizer, x, settings.max_prompt_length) for x in ids]
    record = asdict(settings) | {"num_prompts": len(prompts)}
    bs, n = settings.batch_size, len(prompts)
    rows: list[dict] = []
    common = dict(max_new_tokens=settings.max_new_tokens, batch_size=bs)
    if settings.greedy:
        for i, text in enumerate(generate_responses(model, tokenizer, ids, do_sample=False, **common)):
            rows.append(_row(i, 0, "greedy", None, prompts[i], text, record))
    for s in range(settings.num_samples):
        base = settings.seed + s * n  # generate_responses seeds each batch with base + its first prompt's index
        texts = generate_responses(model, tokenizer, ids, do_sample=True, temperature=settings.temperature,
                                   top_p=settings.top_p, seed=base, **common)
        for i, text in enumerate(texts):
            rows.append(_row(i, s, "sampled", base + (i // bs) * bs, prompts[i], text, record))
    return rows


def _row(i: int, s: int, mode: str, seed: int | None, prompt: str, response: str, settings: dict) -> dict:
    return {"prompt_index": i, "sample_index": s, "mode": mode, "seed": seed, "prompt": prompt,
            "response": response, "settings": settings}


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: the file appears whole or not at all."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def repetition_by_mode(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """:func:`dynlab.evaluation.repetition.summarize` of the responses of each mode (greedy, sampled)."""
    from dynlab.evaluation.repetition import summarize

    modes = dict.fromkeys(r["mode"] for r in rows)
    return {m: summarize([r["response"] for r in rows if r["mode"] == m]) for m in modes}
