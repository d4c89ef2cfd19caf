"""``dynlab generate`` and ``dynlab judge``: responses of a model to a prompt set, and a pairwise win rate.

    dynlab generate --model runs/dpo/version_1 --prompts runs/dpo/version_1:test --out gen.jsonl --num-samples 2
    dynlab judge extend.jsonl base.jsonl --judge hf:embedded:smollm2-135m-instruct --out judge/
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from dynlab.errors import InputError


def generate_command(argv: Sequence[str]) -> None:
    """``dynlab generate``: greedy and seeded sampled responses of a model to a prompt set, as jsonl (every row
    carries the generation settings), plus the repetition table (printed, and written next to the output as
    ``OUT.repetition.json``)."""
    parser = argparse.ArgumentParser(prog="dynlab generate", description=generate_command.__doc__)
    parser.add_argument("--model", required=True,
                        help="a run directory (its export/), an HF directory, tiny or embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts", required=True,
                        help="RUN_DIR[:train|test] (its probe split), synthetic[:train|test], or a .jsonl/.json/"
                             ".parquet probe, preference or prompt-only file")
    parser.add_argument("--out", required=True, help="output .jsonl")
    parser.add_argument("--num-samples", type=int, default=1, help="sampled responses per prompt")
    parser.add_argument("--no-greedy", dest="greedy", action="store_false", help="no greedy response")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts")
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help="keep the last N prompt tokens, as training does (default: the whole prompt)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    _check(args.num_samples >= 0 and (args.greedy or args.num_samples > 0),
           "ask for a greedy response or --num-samples >= 1", "num_samples")
    _check(args.max_new_tokens >= 1 and args.batch_size >= 1, "must be >= 1", "max_new_tokens/batch_size")
    _check(args.temperature > 0 and 0 < args.top_p <= 1, "need temperature > 0 and 0 < top_p <= 1", "temperature")
    _check(args.limit is None or args.limit >= 1, "must be >= 1", "limit")
    _check(args.max_prompt_length is None or args.max_prompt_length >= 1, "must be >= 1", "max_prompt_length")

    from dynlab.evaluation.generation import (
        GenerationSettings,
        generate_rows,
        load_prompts,
        repetition_by_mode,
        resolve_model,
        write_text_atomic,
    )
    from dynlab.evaluation.repetition import markdown_table
    from dynlab.models.load import ModelSpec, load_model, load_tokenizer
    from dynlab.tracking.trajectory import write_jsonl

    path = resolve_model(args.model)
    spec = ModelSpec(name_or_path=path, dtype=args.dtype)
    tokenizer = load_tokenizer(spec)
    prompts = load_prompts(args.prompts, tokenizer, limit=args.limit)  # bad prompts fail before the model loads
    model = load_model(spec)
    settings = GenerationSettings(model=args.model, model_path=path, prompts=args.prompts,
                                  max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                  num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed, batch_size=args.batch_size, max_prompt_length=args.max_prompt_length,
                                  dtype=args.dtype, num_prompts=len(prompts))
    start = time.monotonic()
    rows = generate_rows(model, tokenizer, prompts, settings)
    table = repetition_by_mode(rows)
    out = write_jsonl(args.out, rows)
    stats_path = out.with_suffix(".repetition.json")
    write_text_atomic(stats_path, _dumps({"model": args.model, "file": str(out), "repetition": table}))
    print(f"{out}: {len(rows)} responses to {len(prompts)} prompts ({time.monotonic() - start:.0f} s)")
    print(markdown_table(table, first="mode"))
    print(f"repetition statistics: {stats_path}")


def judge_command(argv: Sequence[str]) -> None:
    """``dynlab judge``: pairwise preference between two sets of responses to the same prompts, each pair shown in
    both orders; win rate of A with a bootstrap CI over prompts, ties, position bias. Writes ``verdicts.jsonl``,
    ``summary.json`` and ``summary.md`` into --out."""
    from dynlab.evaluation.judge import JUDGE_SPECS

    parser = argparse.ArgumentParser(prog="dynlab judge", description=judge_command.__doc__)
    parser.add_argument("a", help="responses of model A: a dynlab generate .jsonl, or FILE.jsonl:FIELD")
    parser.add_argument("b", help="responses of model B, to the same prompts")
    parser.add_argument("--judge", required=True, help=JUDGE_SPECS + "; the API key is read from the environment")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"), help="names in the summary")
    parser.add_argument("--mode", choices=["all", "greedy", "sampled"], default="all",
                        help="judge only the greedy or the sampled responses")
    parser.add_argument("--tie-margin", type=float, default=0.0,
                        help="hf/rm judges: a margin (nats, reward units) within which a verdict is a tie")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--max-chars", type=int, default=2000, help="responses are cut to this for the judge")
    parser.add_argument("--max-tokens", type=int, default=16, help="openai judges: reply length limit")
    parser.add_argument("--workers", type=int, default=4, help="openai judges: concurrent requests")
    parser.add_argument("--timeout", type=float, default=60.0, help="openai judges: seconds per request")
    parser.add_argument("--retries", type=int, default=3, help="openai judges: retries on 429/5xx/timeouts")
    parser.add_argument("--batch-size", type=int, default=8, help="hf/rm judges: prompts per forward")
    args = parser.parse_args(argv)
    _check(args.resamples >= 1 and args.max_chars >= 1 and args.batch_size >= 1 and args.workers >= 1,
           "must be >= 1", "resamples/max_chars/batch_size/workers")
    _check(args.tie_margin >= 0 and args.retries >= 0 and args.timeout > 0, "must be >= 0", "tie_margin/retries")

    from dynlab import __version__
    from dynlab.chat import redact_spec
    from dynlab.evaluation.generation import write_text_atomic
    from dynlab.evaluation.judge import (
        JUDGE_PROMPT,
        judge_from_spec,
        judge_pairs,
        pair_responses,
        read_responses,
        summarize_verdicts,
        summary_markdown,
    )
    from dynlab.tracking.trajectory import write_jsonl

    (a_rows, a_model), (b_rows, b_model) = read_responses(args.a), read_responses(args.b)
    if args.mode != "all":
        a_rows, b_rows = ([r for r in rows if r["mode"] == args.mode] for rows in (a_rows, b_rows))
        _check(bool(a_rows) and bool(b_rows), f"no {args.mode} responses in one of the files", "mode")
    pairs = pair_responses(a_rows, b_rows, args.a, args.b)
    judge = judge_from_spec(args.judge, tie_margin=args.tie_margin, batch_size=args.batch_size,
                            max_tokens=args.max_tokens, workers=args.workers, timeout=args.timeout,
                            retries=args.retries)
    start = time.monotonic()
    try:
        records = judge_pairs(judge, pairs, max_chars=args.max_chars)
    except RuntimeError as err:  # an endpoint that kept failing (its message names the URL, never the key)
        raise InputError(f"the judge failed: {err}", field="judge") from err
    stats = dict(resamples=args.resamples, seed=args.seed)
    labels = args.labels or [a_model or args.a, b_model or args.b]
    modes = sorted({r["mode"] for r in records if r["mode"] is not None})
    summary = {
        "a": {"label": labels[0], "file": args.a}, "b": {"label": labels[1], "file": args.b},
        "judge": redact_spec(args.judge), "judge_kind": type(judge).__name__, "prompt_template": JUDGE_PROMPT,
        "tie_margin": args.tie_margin, "max_chars": args.max_chars, "bootstrap": stats, "dynlab_version": __version__,
        "seconds": round(time.monotonic() - start, 1),
        "overall": summarize_verdicts(records, **stats),
        "by_mode": {m: summarize_verdicts([r for r in records if r["mode"] == m], **stats) for m in modes}
        if len(modes) > 1 else {},
    }
    out = Path(args.out)
    markdown = summary_markdown(summary)
    write_jsonl(out / "verdicts.jsonl", records)
    write_text_atomic(out / "summary.json", _dumps(summary))
    write_text_atomic(out / "summary.md", markdown + "\n")
    print(markdown)
    print(f"dynlab: wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'verdicts.jsonl'}")


def _check(ok: bool, message: str, field: str) -> None:
    if not ok:
        raise InputError(message, field=field)


def _dumps(value: object) -> str:
    return json.dumps(_json_safe(value), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _json_safe(value: object) -> object:
    """NaN becomes null (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
