"""The harness every benchmark shares: the machine it ran on, timing, peak memory, the benchmark data and models,
and result files (``benchmarks/results/NAME.json``).

Figures are ratios against a peer measured in the same process, with the systems alternated round by round: the
machine is shared, so absolute times mean little.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
HH_PROBE_FILE = REPO.parent / "shared" / "data" / "hh_probe" / "probe_test.jsonl"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- command line and machine ---------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="fp32, or bf16 (mixed precision in training, bf16 weights in probe scoring)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on cpu: on a shared 2-core machine two OpenMP threads "
                             "slow down 10x whenever another process runs; all cores on cuda)")
    parser.add_argument("--quick", action="store_true", help="a few seconds per figure, for development")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the result JSON goes")
    return parser


def setup_torch(args: argparse.Namespace) -> None:
    """Threads, seed and the TF32 setting (off: fp32 means fp32) for a benchmark process."""
    threads = args.threads or (1 if args.device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """What the figures were measured on; every result file carries it."""
    cuda = args.device.startswith("cuda")
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(torch.device(args.device)) if cuda else "cpu",
        "device_kind": "cuda" if cuda else "cpu",
        "dtype": args.dtype,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_available": torch.cuda.is_available(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "lightning", "trl", "accelerate", "dynlab")},
        "quick": bool(args.quick),
    }
    if not torch.cuda.is_available():
        info["gpu_note"] = "no GPU was available to this run; CUDA/bf16 figures need --device cuda --dtype bf16"
    return info


# ---- timing ---------------------------------------------------------------------------------------------------------
def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, Any]:
    """The ratio of medians, with min-max over the rounds' own ratios (round i of one against round i of the other)."""
    per_round = [a / b for a, b in zip(numerators, denominators)]
    return {"median": statistics.median(numerators) / statistics.median(denominators), "min": min(per_round),
            "max": max(per_round), "per_round": per_round}


def timed(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def rotate(items: Sequence, k: int) -> list:
    """``items`` rotated by ``k`` (the order of the systems changes every round)."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x: the scaling exponent."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


# ---- peak memory ----------------------------------------------------------------------------------------------------
_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_mb(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, Any]:
    """Peak memory ``fn`` adds over what was live before it, in MiB.

    CUDA: ``max_memory_allocated`` growth. CPU: growth of the resident set's high-water mark, reset just before
    (``/proc/self/clear_refs``) after handing freed heap back to the OS (``malloc_trim``), so that memory freed by
    an earlier measurement cannot hide this one's.
    """
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, out
    _malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS")
    out = fn()
    return (_status_kb("VmHWM") - before) / 1024, out


# ---- data and models ------------------------------------------------------------------------------------------------
def smollm2_dir() -> str:
    """The local directory of the embedded SmolLM2 (dequantized once into dynlab's cache)."""
    from dynlab.models.load import ModelSpec, resolve_dir

    return resolve_dir(ModelSpec())


def model_spec(name: str, dtype: str = "float32"):
    """``smollm2``: the embedded SmolLM2-135M-Instruct; ``llama20m``: a random-init Llama of about 20M parameters
    (hidden 256, 8 layers, MLP 1024) with SmolLM2's tokenizer, so both models see the same token ids."""
    from dynlab.models.load import ModelSpec, load_tokenizer

    if name == "smollm2":
        return ModelSpec(dtype=dtype)
    if name == "llama20m":
        tok = load_tokenizer(ModelSpec())
        return ModelSpec(name_or_path="tiny", tokenizer=smollm2_dir(), dtype=dtype, tiny_config=dict(
            vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    raise ValueError(f"unknown benchmark model {name!r}; expected smollm2 or llama20m")


def hh_rows(path: Path = HH_PROBE_FILE, start: int = 0, limit: int | None = None) -> list[dict]:
    """Rows of the paper's HH probe file (prompt, chosen, rejected and every probe type), as dynlab reads them."""
    from dynlab.data.formats import load_rows

    if not Path(path).is_file():
        raise SystemExit(f"benchmark data missing: {path} (the paper's HH probe file, ../shared/data/hh_probe/)")
    rows = load_rows(str(path), format="probe")
    return rows[start: None if limit is None else start + limit]


def preference_examples(tokenizer, rows: list[dict], max_length: int, max_prompt_length: int) -> list[dict]:
    """Token ids ``{"index", "prompt_ids", "chosen_ids", "rejected_ids"}``, cut by dynlab's truncation policy
    (prompt to its last ``max_prompt_length`` tokens, then responses keeping their start)."""
    from dynlab.data.tokenize import encode_row

    out = []
    for i, row in enumerate(rows):
        prompt, enc = encode_row(tokenizer, row["prompt"], {"chosen": row["chosen"], "rejected": row["rejected"]},
                                 max_length=max_length, max_prompt_length=max_prompt_length,
                                 response_truncation="keep_start")
        out.append({"index": i, "prompt_ids": prompt, "chosen_ids": enc["chosen"], "rejected_ids": enc["rejected"]})
    return out


def write_result(out_dir: Path, name: str, result: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    result.setdefault("machine", {})["load_average_at_end"] = list(os.getloadavg())
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def verdict(value: float, target: float, higher_is_better: bool) -> dict[str, Any]:
    ok = value >= target if higher_is_better else value <= target
    return {"value": value, "target": (">= " if higher_is_better else "<= ") + f"{target:.3g}", "pass": bool(ok)}


def with_verdict(ratio: dict[str, Any], target: float, higher_is_better: bool) -> dict[str, Any]:
    """A ``ratio_summary`` with its median's ``target`` and ``pass`` (``verdict``) added beside it."""
    v = verdict(ratio["median"], target, higher_is_better)
    return {**ratio, "target": v["target"], "pass": v["pass"]}
