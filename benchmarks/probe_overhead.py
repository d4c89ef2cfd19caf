"""Probe overhead: the embedded default DPO run with probe evaluation at the paper's cadence, on against off.

    python -m benchmarks.probe_overhead [--steps 10] [--pairs 2] [--quick] [--device cuda --dtype bf16]

The run: ``configs/dpo.yaml``'s model (SmolLM2-135M-Instruct), data (the synthetic set: 96 training pairs, probe_train
and probe_test of 16 prompts x 11 types), batch size, optimizer, precision and gradient clipping, with probe
evaluation at the paper's cadence: every 100 training examples (25 steps at 4 pairs a step) and at step 0. The
config's checkpointing and W&B logger are off in both runs (their disk writes would swamp the comparison); dynlab's
CSV logger stays on, so an evaluation also logs its metrics and writes its trajectory file, as in a real run.

Run length: ``--steps`` optimizer steps (default 10 = 40 examples, to keep ``make bench`` within about half an hour
on a 2-core CPU; evaluations then fall at steps 0 and 10, the last step), ``--pairs`` on/off pairs alternated. A long
run at the paper's cadence does one evaluation per 25 steps, so the figures checked against the target are
projections to it, from quantities measured here:

- ``overhead_long_run`` = median evaluation time / (25 x median training step), both from the probes-on run
  (steps and evaluations interleave in one process, so machine noise hits both alike);
- ``overhead_on_off`` = ((wall on - wall off) / evaluations) / (25 x median step of the probes-off run): the cost
  of an evaluation as the difference of the two runs' training wall times, the runs alternated.

``--steps 50`` measures a 200-example run directly (evaluations at steps 0, 25, 50; about 15 minutes on 2 cores);
``wall_ratio`` (on / off - 1) is reported for whatever run length was measured. Training wall time is measured by a
callback from ``on_train_start`` to ``on_train_end`` (the HF export and figures written after training are excluded
from both runs).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from benchmarks.common import REPO, add_common_args, machine_info, setup_torch, summary, sync, verdict, write_result
from benchmarks.train_throughput import StepTimer, lightning_trainer, quiet_libraries

PAPER_EXAMPLES_PER_EVAL = 100
TARGET_OVERHEAD = 0.15


class WallTimer(L.Callback):
    """Training wall time: ``on_train_start`` to ``on_train_end`` (before the module's export)."""

    def __init__(self, device: str):
        self.device, self.seconds, self._start = device, 0.0, 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def embedded_default(quick: bool) -> tuple[dict, dict, dict]:
    """configs/dpo.yaml's trainer, model and data init_args (the tiny model with ``quick``)."""
    config = yaml.safe_load((REPO / "configs" / "dpo.yaml").read_text())
    model, data = dict(config["model"]["init_args"]), dict(config["data"]["init_args"])
    if quick:
        model["policy"] = {"name_or_path": "tiny"}
    return config["trainer"], model, data


def one_run(probes: bool, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from dynlab.data import ProbeDataModule
    from dynlab.models.load import ModelSpec
    from dynlab.modules import DPOModule
    from dynlab.tracking.loggers import CSVLogger

    trainer_cfg, model_cfg, data_cfg = embedded_default(args.quick)
    opt = model_cfg.pop("optimizer")["init_args"]
    every = PAPER_EXAMPLES_PER_EVAL // data_cfg["batch_size"]
    model_cfg.update(policy=ModelSpec(**model_cfg["policy"]), probe_every_n_steps=every if probes else 0,
                     optimizer=functools.partial(torch.optim.AdamW, **opt))
    module = DPOModule(**model_cfg)
    module.on_train_end = lambda: None  # no HF export or figures: not training, in neither run
    data = ProbeDataModule(**data_cfg)
    eval_times: list[float] = []
    evaluate = module.run_probe_evaluation

    def timed_evaluation() -> None:
        sync(args.device)
        start = time.perf_counter()
        evaluate()
        sync(args.device)
        eval_times.append(time.perf_counter() - start)

    module.run_probe_evaluation = timed_evaluation
    wall, steps = WallTimer(args.device), StepTimer(args.device)
    logger = CSVLogger(save_dir=str(root), name="probes_on" if probes else "probes_off")
    trainer = lightning_trainer(args, args.steps, [wall, steps], str(root), logger=logger,
                                log_every_n_steps=trainer_cfg.get("log_every_n_steps", 1))
    trainer.fit(module, datamodule=data)
    # a step's timer also holds the evaluation that ran in its on_train_batch_start (step 0)
    step_times = list(steps.times)
    if probes and eval_times:
        step_times[0] -= eval_times[0]
    return {"probes": probes, "wall_seconds": wall.seconds, "evaluations": len(eval_times),
            "evaluation_seconds": eval_times, "step_seconds": step_times,
            "probe_rows": sum(len(v) for v in data.probe_examples.values()),
            "responses": sum(len(e["responses"]) for v in data.probe_examples.values() for e in v),
            "every_n_steps": every}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (4 examples each)")
    parser.add_argument("--pairs", type=int, default=2, help="on/off pairs of runs, alternated (off-on, on-off)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 25
    setup_torch(args)
    quiet_libraries()
    runs = []
    with tempfile.TemporaryDirectory(prefix="dynlab-bench-") as root:
        for i in range(args.pairs):
            for probes in ((False, True) if i % 2 == 0 else (True, False)):
                run = one_run(probes, args, Path(root))
                print(f"  probes {'on' if probes else 'off'}: wall {run['wall_seconds']:.1f}s, evaluations "
                      + ", ".join(f"{t:.1f}s" for t in run["evaluation_seconds"]), flush=True)
                runs.append(run)
    on = [r for r in runs if r["probes"]]
    off = [r for r in runs if not r["probes"]]
    every = on[0]["every_n_steps"]
    wall_ratio = [a["wall_seconds"] / b["wall_seconds"] - 1 for a, b in zip(on, off)]
    on_off = [(a["wall_seconds"] - b["wall_seconds"]) / a["evaluations"]
              / (every * statistics.median(b["step_seconds"])) for a, b in zip(on, off)]
    long_run = [statistics.median(r["evaluation_seconds"]) / (every * statistics.median(r["step_seconds"]))
                for r in on]
    result = {
        "benchmark": "probe_overhead", "machine": machine_info(args),
        "settings": {"config": "configs/dpo.yaml" + (" with the tiny model (--quick)" if args.quick else ""),
                     "steps": args.steps, "examples": 4 * args.steps, "probe_every_n_steps": every,
                     "cadence": f"every {PAPER_EXAMPLES_PER_EVAL} training examples and at step 0 (the paper's)",
                     "evaluations_per_run": on[0]["evaluations"], "probe_rows": on[0]["probe_rows"],
                     "responses_per_evaluation": on[0]["responses"],
                     "excluded": "checkpointing, W&B, the HF export and figures after training (both runs)"},
        "runs": runs,
        "wall_on_seconds": summary([r["wall_seconds"] for r in on]),
        "wall_off_seconds": summary([r["wall_seconds"] for r in off]),
        "evaluation_seconds": summary([t for r in on for t in r["evaluation_seconds"]]),
        "step_seconds_on": summary([t for r in on for t in r["step_seconds"]]),
        "step_seconds_off": summary([t for r in off for t in r["step_seconds"]]),
        "overhead_long_run": {**summary(long_run), **verdict(statistics.median(long_run), TARGET_OVERHEAD, False),
                              "definition": f"median evaluation / ({every} x median step), probes-on run"},
        "overhead_on_off": {**summary(on_off), **verdict(statistics.median(on_off), TARGET_OVERHEAD, False),
                            "definition": f"(wall on - wall off) / evaluations / ({every} x median step, off)"},
        "wall_ratio": {**summary(wall_ratio), "definition": "wall on / wall off - 1 for the run length measured"},
    }
    write_result(args.out, "probe_overhead", result)
    return result


if __name__ == "__main__":
    main()
