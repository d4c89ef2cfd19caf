"""What the displacement diagnostics (CHES, edit statistics, rate ratios) add to a probe evaluation.

    python -m benchmarks.displacement [--rounds 3] [--quick] [--device cuda]

The embedded default's probe sets (configs/dpo.yaml's data: the synthetic set, probe_train and probe_test of 16
prompts x 11 types) scored by ``probe_step`` on SmolLM2-135M-Instruct, three arms alternated round by round (the order
rotates): ``off`` (``probe_displacement`` turned off on the module), ``on`` (the steady state: the edit statistics
were computed at an earlier evaluation and are cached) and ``on_cold`` (the first evaluation of a run: the edit cache
cleared first, so the Levenshtein distances are computed too). Reported: the median seconds of each arm and the
ratios of the medians ``on / off`` and ``on_cold / off``, checked against the target of 1.05.

On a shared machine the arms' wall times move by more than the diagnostics cost, so the same process also times the
diagnostics' own work inside one ``on`` and one ``on_cold`` evaluation (every call of the functions ``probe_step``
uses for them, with the device synchronised: ``pair_hidden_sums``, ``ches``, ``pair_edit_stats``, ``rate_ratio`` and
``DisplacementMetric.update``): ``share`` = that time / the evaluation's time, the overhead as 1 + share.

``--entanglement-pairs K`` also times the opt-in gradient entanglement (``model.probe_entanglement_pairs``:
``gradient_entanglement``, two forward/backward passes per pair) on the first K probe pairs of each split, over every
trainable parameter and over the last 4 decoder blocks: seconds per pair, next to one whole probe evaluation's
seconds. ``--entanglement-only`` skips the arms above (minutes on SmolLM2 on the CPU).

    python -m benchmarks.displacement --entanglement-pairs 4 --entanglement-only
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

from benchmarks.common import (
    REPO,
    add_common_args,
    machine_info,
    model_spec,
    ratio_summary,
    rotate,
    setup_torch,
    summary,
    sync,
    timed,
    verdict,
    write_result,
)
from benchmarks.train_throughput import quiet_libraries

TARGET_RATIO = 1.05


def accounted_share(evaluate: Callable[[], None], device: str) -> dict[str, float]:
    """One evaluation with every call of the diagnostics' functions timed (device synchronised around each)."""
    from dynlab.metrics.probe import DisplacementMetric
    from dynlab.modules import base

    spent = [0.0]

    def timing(fn: Callable) -> Callable:
        def wrapped(*a: Any, **k: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(device)
                spent[0] += time.perf_counter() - start
        return wrapped

    names = ("pair_hidden_sums", "ches", "pair_edit_stats", "rate_ratio")
    with mock.patch.multiple(base, **{n: timing(getattr(base, n)) for n in names}), \
            mock.patch.object(DisplacementMetric, "update", timing(DisplacementMetric.update)):
        total = timed(evaluate, device)[0]
    return {"evaluation_seconds": total, "diagnostics_seconds": spent[0], "share": spent[0] / (total - spent[0])}


def entanglement_cost(module: Any, data: Any, pairs: int, device: str) -> dict[str, Any]:
    """Seconds per pair of ``gradient_entanglement`` on the first ``pairs`` probe pairs of each split, every trainable
    parameter (``all``) and the last 4 decoder blocks (``last_4_blocks``); one warm-up call first."""
    from dynlab.dynamics.influence import gradient_entanglement, trainable_params

    layers = module.policy.config.num_hidden_layers
    last_4 = rf"layers\.({'|'.join(str(i) for i in range(layers - 4, layers))})\."
    examples = [e for split in data.probe_types for e in sorted(data.probe_examples[split],
                                                                key=lambda e: e["index"])[:pairs]]

    def one(example: dict, pattern: str | None) -> None:
        r = example["responses"]
        gradient_entanglement(module.policy, example["prompt_ids"], r["chosen"], r["rejected"], params=pattern)

    out = {}
    for label, pattern in (("all", None), ("last_4_blocks", last_4)):
        one(examples[0], pattern)
        times = [timed(functools.partial(one, e, pattern), device)[0] for e in examples]
        out[label] = {"pattern": pattern, "parameters": sum(p.numel() for p in trainable_params(module.policy,
                                                                                                  pattern).values()),
                      "seconds_per_pair": summary(times)}
    out["tokens_per_pair"] = statistics.median(len(e["prompt_ids"]) + len(e["responses"]["chosen"])
                                               + len(e["responses"]["rejected"]) for e in examples)
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import yaml
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from dynlab.data import ProbeDataModule
    from dynlab.modules import SFTModule

    data_cfg = yaml.safe_load((REPO / "configs" / "dpo.yaml").read_text())["data"]["init_args"]
    module = SFTModule(policy=model_spec(args.model)).to(args.device)
    module.policy.eval()
    data = ProbeDataModule(**data_cfg)
    data.prepare(module.tokenizer, "sft")
    module.init_probe_state(data)
    batches = {s: [move_data_to_device(b, args.device) for b in data.probe_dataloader(s)] for s in data.probe_types}

    def evaluate(arm: str) -> None:
        module.probe_displacement = arm != "off"
        if arm == "on_cold":
            module.pair_edit_cache.clear()
        for split, split_batches in batches.items():
            for batch in split_batches:
                module.probe_step(split, batch)
        module.compute_probe_metrics()

    for arm in ("on",) if args.entanglement_only else ("off", "on"):  # warm-up (and the edit cache filled)
        evaluate(arm)
    entanglement = {}
    if args.entanglement_pairs:
        entanglement = {"entanglement": {"evaluation_seconds": timed(lambda: evaluate("on"), args.device)[0],
                                         **entanglement_cost(module, data, args.entanglement_pairs, args.device)}}
        if args.entanglement_only:
            return {"probe_rows": sum(len(v) for v in data.probe_examples.values()), **entanglement}
    times: dict[str, list[float]] = {"off": [], "on": [], "on_cold": []}
    for i in range(args.rounds):
        for arm in rotate(list(times), i):
            times[arm].append(timed(lambda arm=arm: evaluate(arm), args.device)[0])
        print(f"  round {i}: " + ", ".join(f"{a} {t[-1]:.2f}s" for a, t in times.items()), flush=True)
    ratio, cold = ratio_summary(times["on"], times["off"]), ratio_summary(times["on_cold"], times["off"])
    accounted = {arm: accounted_share(functools.partial(evaluate, arm), args.device) for arm in ("on", "on_cold")}
    return {"accounted": accounted, "probe_rows": sum(len(v) for v in data.probe_examples.values()),
            "probe_types": len(next(iter(data.probe_types.values()))),
            "seconds": {arm: summary(t) for arm, t in times.items()},
            "ratio_on_off": ratio, "ratio_cold_off": cold,
            "verdict_on_off": verdict(ratio["median"], TARGET_RATIO, higher_is_better=False),
            "verdict_cold_off": verdict(cold["median"], TARGET_RATIO, higher_is_better=False),
            "median_extra_seconds": statistics.median(times["on"]) - statistics.median(times["off"]), **entanglement}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "llama20m"))
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (each arm once per round)")
    parser.add_argument("--entanglement-pairs", type=int, default=0,
                        help="also time gradient entanglement on this many probe pairs per split (0: not timed)")
    parser.add_argument("--entanglement-only", action="store_true", help="time the entanglement alone")
    args = parser.parse_args(argv)
    if args.quick:
        args.model = "llama20m"
    setup_torch(args)
    quiet_libraries()
    result = {"benchmark": "displacement", "machine": machine_info(args),
              "settings": {"model": args.model, "rounds": args.rounds, "entanglement_pairs": args.entanglement_pairs},
              **measure(args)}
    if "entanglement" in result:
        e = result["entanglement"]
        print("gradient entanglement per pair: " + ", ".join(
            f"{label} {e[label]['seconds_per_pair']['median']:.3f}s ({e[label]['parameters']:,} parameters)"
            for label in ("all", "last_4_blocks")) + f"; one probe evaluation {e['evaluation_seconds']:.2f}s",
            flush=True)
    if args.entanglement_only:
        write_result(args.out, "entanglement", result)
        return result
    print(f"probe evaluation with / without the displacement diagnostics: {result['ratio_on_off']['median']:.4f} "
          f"(first evaluation {result['ratio_cold_off']['median']:.4f}; target <= {TARGET_RATIO}); accounted: "
          + ", ".join(f"{arm} 1 + {a['share']:.4f}" for arm, a in result["accounted"].items()), flush=True)
    write_result(args.out, "displacement", result)
    return result


if __name__ == "__main__":
    main()
