"""Slow tier: LoRA on the real model and real data. ``dynlab reproduce`` at its quick size, SFT -> DPO only, with the
LoRA overlay (configs/lora.yaml: r 16, alpha 32, every linear layer) and every learning rate x 10 — SFT-LoRA on 40
HH helpful-base pairs of the shared probe file, then DPO-LoRA from its export (policy and reference start from the SFT
result; the reference is the base with the adapter disabled). The paper's signatures (PAPER_NOTES §9) are decided by
``dynlab.evaluation.signatures``, as for full finetuning (tests/test_signatures.py).

``SHOWN`` are the signatures this run shows, measured (README "LoRA"); the rest are reported "not shown (at this
scale)" with their numbers and not asserted: §10 on probe_train, where DPO-LoRA raises chosen (+10 nats) while full
DPO lowers it, the difference the README reports; §4, §8, §9 on probe_test, as full finetuning at this size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynlab.evaluation.signatures import check_signatures, signature_table
from dynlab.reproduce import stage_runs
from tests.conftest import CONFIGS, SHARED_PROBE_FILE, run_dynlab

pytestmark = pytest.mark.slow

SHOWN = {
    "train": {4, 5, 6, 7, 8, 9, 11, 12, 16},
    "test": {5, 6, 7, 10, 11, 12, 16},
}


@pytest.fixture(scope="module")
def lora_runs(module_tmp) -> dict[str, Path]:
    if not SHARED_PROBE_FILE.is_file():
        pytest.skip(f"the shared HH rows are not at {SHARED_PROBE_FILE}")
    cwd = module_tmp("lora")
    proc = run_dynlab("reproduce", "--data", str(SHARED_PROBE_FILE), "--sizes", str(CONFIGS / "reproduce" / "quick"),
                      "--stages", "sft,dpo", "--config", str(CONFIGS / "lora.yaml"), "--lr-scale", "10",
                      "--out", "out", cwd=cwd, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return stage_runs(cwd / "out")


@pytest.mark.parametrize("split", sorted(SHOWN))
def test_lora_shows_the_papers_signatures(lora_runs, split):
    signatures = check_signatures(list(lora_runs.values()), split)
    print(signature_table(signatures))
    failed = [f"{s.id} ({', '.join(s.runs)}): {s.claim} {s.numbers} {s.detail}" for s in signatures
              if s.id in SHOWN[split] and s.passed is not True]
    assert SHOWN[split] <= {s.id for s in signatures} and not failed, "\n".join(failed)


def test_the_lora_chain_trains_adapters_only_and_exports_both(lora_runs):
    from transformers import AutoModelForCausalLM

    for name, run in lora_runs.items():
        config = json.loads((run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
        assert config["r"] == 16 and config["lora_alpha"] == 32, name
        assert (run / "export" / "model.safetensors").is_file(), name
    # the DPO adapter records the SFT export it was trained on; the merged export is a plain model
    dpo = json.loads((lora_runs["dpo"] / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert Path(dpo["base_model_name_or_path"]) == (lora_runs["sft"] / "export").resolve()
    model = AutoModelForCausalLM.from_pretrained(lora_runs["dpo"] / "export")
    assert not any("lora" in name for name, _ in model.named_parameters())
