"""Cost of DynamicsCallback's work per evaluation on the embedded default (SmolLM2-135M), as a ratio against one
probe evaluation of the same run measured alternately in the same process.

    python benchmarks/dynamics_cost.py [--repeats 3] [--num-examples 4]

The callback's work is timed piece by piece, exactly as it runs it: keep θ and log π (capture), the gradient
similarity over the last 4 of 30 blocks, and after the step the observed change plus the two forward-mode
predictions (actual update and SGD form). The update is one real AdamW step on a DPO batch, so the accuracy figures
(Pearson r and median relative error of predicted vs observed Δ log π) are those of the shipped learning rate.
Writes benchmarks/results/dynamics_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from dynlab.data.datamodule import ProbeDataModule
from dynlab.dynamics.influence import directional_change, gradient_similarity, pack, sequence_logps
from dynlab.losses.dpo import dpo_loss
from dynlab.modules import DPOModule

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-examples", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-6, help="configs/dpo.yaml's AdamW learning rate")
    parser.add_argument("--similarity-params", default=r"layers\.(2[6-9])\.")
    args = parser.parse_args()
    torch.manual_seed(0)
    module = DPOModule()  # the embedded SmolLM2 policy and its frozen reference
    data = ProbeDataModule(num_train=96, num_heldout=32, probe_size=16, max_length=128, max_prompt_length=64)
    data.prepare(module.tokenizer, "dpo")
    module.init_probe_state(data)
    model = module.policy
    model.eval()  # dropout off, as during training (dynlab disables it)
    examples = data.probe_examples["train"][: args.num_examples]
    types = data.probe_types["train"]
    batch = pack([(ex["prompt_ids"], ex["responses"][t]) for ex in examples for t in types])
    train_batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    timings: dict[str, list[float]] = {k: [] for k in ("probe_evaluation", "capture", "similarity", "finish")}
    accuracy = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for split in module.probe_types:
            for probe_batch in data.probe_dataloader(split):
                module.probe_step(split, move_data_to_device(probe_batch, "cpu"))
        module.compute_probe_metrics()
        timings["probe_evaluation"].append(time.perf_counter() - start)

        start = time.perf_counter()
        before_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            before = sequence_logps(model, batch)
        timings["capture"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for ex in examples:
            gradient_similarity(model, ex["prompt_ids"], {t: ex["responses"][t] for t in types},
                                params=args.similarity_params)
        timings["similarity"].append(time.perf_counter() - start)

        optimizer.zero_grad()  # one real DPO step (not timed: it is the training the callback observes)
        logps = module.sequence_logps(train_batch)
        with torch.no_grad():
            ref = module.sequence_logps(train_batch, module.reference)
        half = logps.shape[0] // 2
        dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], beta=0.1)[0].mean().backward()
        start = time.perf_counter()
        sgd_update = {n: -args.lr * p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
        timings["capture"][-1] += time.perf_counter() - start
        optimizer.step()

        start = time.perf_counter()
        delta = {n: p.detach() - before_params[n] for n, p in model.named_parameters() if n in before_params}
        with torch.no_grad():
            observed = sequence_logps(model, batch) - before
        predicted = directional_change(model, batch, delta, at=before_params)
        directional_change(model, batch, sgd_update, at=before_params)
        timings["finish"].append(time.perf_counter() - start)
        rel = (predicted - observed).abs() / observed.abs()
        accuracy.append({"pearson_r": torch.corrcoef(torch.stack([predicted, observed]))[0, 1].item(),
                         "median_rel_error": rel.median().item()})

    callback = [c + s + f for c, s, f in zip(timings["capture"], timings["similarity"], timings["finish"])]
    ratios = [c / p for c, p in zip(callback, timings["probe_evaluation"])]

    def summary(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    result = {
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "observed_responses": batch["input_ids"].shape[0], "probe_responses_per_evaluation": sum(
            len(e["responses"]) for v in data.probe_examples.values() for e in v),
        "seconds": {k: summary(v) for k, v in timings.items()} | {"callback_total": summary(callback)},
        "callback_over_probe_evaluation": summary(ratios),
        "accuracy_per_step": accuracy,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dynamics_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
