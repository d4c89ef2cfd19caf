"""Time and peak memory of one probe evaluation of the embedded default (SmolLM2-135M, configs/dpo.yaml's probe set).

    python benchmarks/probe_eval.py [--repeats 3]

Peak memory is measured in a fresh process as the growth of the peak RSS over what loading the model took, so it
includes every activation, KV cache and (chunk, V) float32 block the evaluation held at once.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from dynlab.data.datamodule import ProbeDataModule
from dynlab.modules import DPOModule


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = DPOModule()  # the embedded SmolLM2 policy and its frozen reference
    data = ProbeDataModule(num_train=96, num_heldout=32, probe_size=16, max_length=128, max_prompt_length=64)
    data.prepare(module.tokenizer, "dpo")

    module.init_probe_state(data)
    module.policy.eval()
    before = peak_rss_mb()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for split in module.probe_types:
            for batch in data.probe_dataloader(split):
                module.probe_step(split, move_data_to_device(batch, "cpu"))
        module.compute_probe_metrics()
        times.append(time.perf_counter() - start)
    rows = sum(len(v) for v in data.probe_examples.values())
    responses = sum(len(e["responses"]) for v in data.probe_examples.values() for e in v)
    result = {"probe_rows": rows, "responses": responses, "seconds_median": statistics.median(times),
              "seconds_min": min(times), "seconds_max": max(times), "peak_rss_growth_mb": peak_rss_mb() - before,
              "largest_vocab_block_mb": 1024 * module.policy.config.vocab_size * 4 / 2**20,
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
