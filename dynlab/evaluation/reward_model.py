"""A local reward model for ``rm:DIR`` judges: a frozen backbone's final hidden state (what a sequence-classification
head reads) under a linear head fitted as Bradley–Terry on preference pairs by L2-regularised logistic regression.

    dynlab reward-model --data probe_test.jsonl --base embedded:smollm2-135m-instruct --rows 80: --out rm_dir
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynlab.errors import InputError

MIN_TRAIN_PAIRS = 2


# --- maths ----------------------------------------------------------------------------------------------------------


def fit_bradley_terry(diffs: torch.Tensor, l2: float = 1.0, max_iter: int = 500) -> torch.Tensor:
    """The head ``w`` maximising the Bradley–Terry likelihood P(chosen > rejected) = sigmoid(w·(h+ − h−)).

    Minimises ``sum_i softplus(−v·z_i) + l2/2 ‖v‖²`` over features standardised by their spread, ``z = d / s`` with
    ``s`` the per-feature root mean square of the differences (no centring: a Bradley–Terry model has no bias, it
    cancels), by LBFGS in float64; the scaling is folded back, ``w = v / s``, so ``w·d = v·z``.

    Args:
        diffs: (N, H) feature differences chosen minus rejected.
        l2: the penalty on the standardised weights (larger: smoother head); > 0 keeps separable data finite.
        max_iter: LBFGS iterations.

    Returns:
        (H,) float64 weights on the raw features.
    """
    d = diffs.to(torch.float64)
    scale = d.pow(2).mean(0).sqrt().clamp_min(1e-12)  # (H,)
    z = d / scale  # (N, H)
    v = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.softplus(-(z @ v)).sum() + 0.5 * l2 * v.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (v.detach() / scale).detach()


def pairwise_stats(diffs: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (a tie counts half) and mean margin ``w·(h+ − h−)`` of a head on (N, H) differences."""
    margin = diffs.to(torch.float64) @ w.to(torch.float64)  # (N,)
    if margin.numel() == 0:
        return {"pairs": 0, "accuracy": float("nan"), "mean_margin": float("nan")}
    accuracy = ((margin > 0).double() + 0.5 * (margin == 0).double()).mean()
    return {"pairs": int(margin.numel()), "accuracy": float(accuracy), "mean_margin": float(margin.mean())}


def parse_rows(text: str | None, n: int) -> range:
    """The row indices ``text`` selects from ``n`` rows, in Python slice syntax (``"80:"``, ``":40"``, ``"10:20"``,
    ``"-50:"``); None selects all.

    >>> parse_rows("80:", 100), parse_rows(None, 3), parse_rows("-2:", 5)
    (range(80, 100), range(0, 3), range(3, 5))
    """
    if text is None:
        return range(n)
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise InputError(f"expected a slice A:B (either may be left out, e.g. 80: or :40), got {text!r}",
                         field="--rows")
    try:
        bounds = [int(p) if p.strip() else None for p in parts]
    except ValueError as err:
        raise InputError(f"expected a slice A:B of integers, got {text!r}", field="--rows") from err
    if len(bounds) == 3 and bounds[2] == 0:
        raise InputError("the slice step cannot be 0", field="--rows")
    return range(n)[slice(*bounds)]


# --- the model ------------------------------------------------------------------------------------------------------


def build_reward_model(base: str, seed: int = 0) -> tuple[Any, Any]:
    """A sequence-classification model (one output, score head zero) over the frozen backbone of ``base``, and its
    tokenizer with a pad token and right padding (the head reads the last non-pad token).

    The model is built from the causal LM's config and the backbone's weights copied in, so any source dynlab loads
    works (``tiny``, the embedded GGUF's dequantized directory, a run's export, an HF directory), and
    ``save_pretrained`` works even where a GGUF-loaded model would refuse it.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dynlab.evaluation.generation import resolve_model
    from dynlab.models.load import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec(name_or_path=resolve_model(base), seed=seed)
    tokenizer = load_tokenizer(spec)  # pad token = EOS where it has none
    tokenizer.padding_side = "right"
    causal = load_model(spec).float()
    config = AutoConfig.for_model(**{k: v for k, v in causal.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "architectures",
                                                  "id2label", "label2id", "num_labels")})
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    try:
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    except ValueError as err:
        raise InputError(f"{config.model_type} has no sequence-classification head in transformers",
                         field="--base") from err
    model.base_model.load_state_dict(causal.base_model.state_dict())
    del causal
    head = _head(model)
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:  # it would cancel in every comparison; 0 keeps rewards centred on w·h
            head.bias.zero_()
    model.requires_grad_(False)
    return model.eval(), tokenizer


def _head(model: Any) -> nn.Linear:
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise InputError(f"{type(model).__name__} has no one-output linear `score` head", field="--base")
    return head


@torch.no_grad()
def pooled_features(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8,
                    label: str = "features") -> torch.Tensor:
    """What the score head reads for each text: the final hidden state (after the final norm) at the last non-pad
    token, computed by the model's own forward with the head swapped for the identity, tokenized as
    :class:`~dynlab.evaluation.judge.RewardModelJudge` does. Texts run longest first; progress goes to stderr.

    Returns:
        (N, H) float32 features in the order of ``texts``.
    """
    head = _head(model)
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    model.score = nn.Identity()
    start_time, batches = time.monotonic(), (len(texts) + batch_size - 1) // batch_size
    try:
        for b, start in enumerate(range(0, len(order), batch_size)):
            chunk = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, truncation=True)
            pooled = model(**enc.to(device)).logits.float().cpu()  # (B, H): the identity "score" at the pooled token
            for i, row in zip(chunk, pooled):
                out[i] = row
            if b + 1 == batches or (b + 1) % max(1, batches // 10) == 0:
                print(f"dynlab: reward-model: {label} {min(start + batch_size, len(texts))}/{len(texts)} "
                      f"({time.monotonic() - start_time:.0f} s)", file=sys.stderr, flush=True)
    finally:
        model.score = head
    return torch.stack(out) if out else torch.zeros(0, model.config.hidden_size)  # type: ignore[arg-type]


# --- orchestration --------------------------------------------------------------------------------------------------


@dataclass
class RewardFit:
    """A fitted reward head and what it was fitted on.

    Args:
        w: (H,) float64 head on the raw features.
        chosen: (N, H) features of the chosen responses of the selected rows (training rows first).
        rejected: (N, H) features of the rejected responses.
        n_train: the first ``n_train`` rows trained the head; the rest are held out.
        summary: what ``reward_model.json`` records.
    """

    w: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    n_train: int
    summary: dict[str, Any]


def train_reward_model(data: str, base: str, out: str | Path, rows: str | None = None, heldout_fraction: float = 0.2,
                       batch_size: int = 8, l2: float = 1.0, seed: int = 0) -> RewardFit:
    """Fit a reward head on the preference rows of ``data`` and write the model to ``out`` (atomically).

    Args:
        data: preference rows in any format ``dynlab fit``'s data module reads (HH, chat, flat, probe jsonl).
        base: the backbone: anything ``dynlab generate --model`` accepts.
        out: the output directory (an HF sequence-classification model + tokenizer + ``reward_model.json``).
        rows: the rows used, in Python slice syntax on row order (default all).
        heldout_fraction: the last fraction of the selected rows is held out (not fitted on).
        batch_size: texts per forward.
        l2: the L2 penalty of :func:`fit_bradley_terry`.
        seed: torch seed (and the random init of ``tiny``).
    """
    from dynlab import __version__
    from dynlab.data.formats import load_rows
    from dynlab.evaluation.judge import reward_text

    _check_args(data, out, heldout_fraction, batch_size, l2)
    started = time.monotonic()
    torch.manual_seed(seed)
    model, tokenizer = build_reward_model(base, seed=seed)
    render = None
    if getattr(tokenizer, "chat_template", None):  # chat rows' prompts rendered as dynlab fit renders them
        def render(messages):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    all_rows = load_rows(data, render_chat=render, require_rejected=True)
    picked = parse_rows(rows, len(all_rows))
    selected = [all_rows[i] for i in picked]
    n_heldout = round(len(selected) * heldout_fraction)
    n_train = len(selected) - n_heldout
    if n_train < MIN_TRAIN_PAIRS or (heldout_fraction > 0 and n_heldout < 1):
        raise InputError(f"--rows {rows or ':'} selects {len(selected)} of {len(all_rows)} rows, giving {n_train} "
                         f"training and {n_heldout} held-out pairs; need >= {MIN_TRAIN_PAIRS} and >= 1",
                         file=data, field="--rows")
    chosen = pooled_features(model, tokenizer, [reward_text(tokenizer, r["prompt"], r["chosen"]) for r in selected],
                             batch_size, label="chosen")
    rejected = pooled_features(model, tokenizer,
                               [reward_text(tokenizer, r["prompt"], r["rejected"]) for r in selected],
                               batch_size, label="rejected")
    diffs = chosen.double() - rejected.double()  # (N, H)
    w = fit_bradley_terry(diffs[:n_train], l2=l2)
    with torch.no_grad():
        _head(model).weight.copy_(w.to(torch.float32).unsqueeze(0))  # (1, H)
    summary = {
        "data": str(data), "rows": rows or ":", "row_range": [picked.start, picked.stop, picked.step],
        "train_rows": n_train, "heldout_rows": n_heldout, "heldout_fraction": heldout_fraction,
        "train": pairwise_stats(diffs[:n_train], w), "heldout": pairwise_stats(diffs[n_train:], w),
        "l2": l2, "base": base, "seed": seed, "batch_size": batch_size, "hidden_size": int(w.numel()),
        "head_norm": float(w.norm()), "features": "final hidden state at the last non-pad token (score head input)",
        "objective": "sum softplus(-w.(h+ - h-)) + l2/2 |w * rms(h+ - h-)|^2, LBFGS float64",
        "seconds": round(time.monotonic() - started, 1), "dynlab_version": __version__,
    }
    _save(model, tokenizer, summary, Path(out))
    return RewardFit(w=w, chosen=chosen, rejected=rejected, n_train=n_train, summary=summary)


def _check_args(data: str, out: str | Path, heldout_fraction: float, batch_size: int, l2: float) -> None:
    if not Path(data).is_file():
        raise InputError("no such data file", file=str(data), field="--data")
    if not 0 <= heldout_fraction < 1:
        raise InputError(f"must be in [0, 1), got {heldout_fraction}", field="--heldout-fraction")
    if batch_size < 1:
        raise InputError(f"must be at least 1, got {batch_size}", field="--batch-size")
    if not l2 > 0:
        raise InputError(f"must be > 0 (it keeps separable data's head finite), got {l2}", field="--l2")
    out = Path(out)
    if out.exists() and not (out / "reward_model.json").is_file():
        raise InputError("exists and is not a reward-model directory; refusing to replace it", file=str(out),
                         field="--out")


def _save(model: Any, tokenizer: Any, summary: dict[str, Any], out: Path) -> None:
    """Write to ``OUT.tmp`` and rename, so ``out`` is never half a model; an earlier reward model there is replaced."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "reward_model.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def main(argv: Sequence[str]) -> None:
    """``dynlab reward-model``: fit a reward model's linear head (Bradley–Terry, frozen backbone) on preference rows
    and write an HF sequence-classification directory that ``--judge rm:DIR`` (``dynlab judge``, online DPO's
    ranker) loads; reports pairwise accuracy and mean margin on the training and held-out rows."""
    parser = argparse.ArgumentParser(prog="dynlab reward-model", description=main.__doc__)
    parser.add_argument("--data", required=True, help="preference rows (HH, chat, flat or probe jsonl)")
    parser.add_argument("--base", required=True,
                        help="backbone: embedded:smollm2-135m-instruct, tiny, a run directory or an HF directory")
    parser.add_argument("--out", required=True, help="output directory (written as OUT.tmp, then renamed)")
    parser.add_argument("--rows", default=None, help="rows used, Python slice syntax on row order (e.g. 80:)")
    parser.add_argument("--heldout-fraction", type=float, default=0.2,
                        help="the last fraction of the selected rows is held out")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward")
    parser.add_argument("--l2", type=float, default=1.0, help="L2 penalty on the standardised head")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (and tiny's random init)")
    args = parser.parse_args(argv)
    fit = train_reward_model(args.data, args.base, args.out, rows=args.rows, heldout_fraction=args.heldout_fraction,
                             batch_size=args.batch_size, l2=args.l2, seed=args.seed)
    s = fit.summary
    for split in ("train", "heldout"):
        print(f"{split}: {s[split]['pairs']} pairs, accuracy {s[split]['accuracy']:.3f}, "
              f"mean margin {s[split]['mean_margin']:+.3f}")
    print(f"dynlab: wrote {args.out} ({s['seconds']} s); judge with --judge rm:{args.out}")
