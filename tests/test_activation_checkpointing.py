"""``activation_checkpointing: true`` recomputes the decoder layers in backward and changes no number: the same loss
and gradients for SFT and DPO (whose pairs share their prompt's forward), and probe scoring still uses its KV caches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from dynlab.data.tokenize import collate_probes, collate_sequences
from dynlab.modules import DPOModule, SFTModule
from dynlab.modules.base import CausalLMModule


def pairs(vocab: int, seed: int = 0) -> dict[str, Tensor]:
    """A DPO batch of 3 pairs: rows [:3] chosen, [3:] rejected, each pair's rows sharing their prompt."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(2, vocab, (n,), generator=gen).tolist()  # noqa: E731
    prompts = [draw(n) for n in (5, 3, 7)]
    chosen, rejected = [draw(n) for n in (4, 6, 2)], [draw(n) for n in (3, 6, 5)]
    batch = collate_sequences(prompts * 2, chosen + rejected, pad_token_id=0)
    batch["index"] = torch.arange(3)
    return batch


def quiet(module: CausalLMModule) -> CausalLMModule:
    """A module whose training_step runs without a Trainer (logging off, one process)."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    module._trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace())
    return module


def loss_and_grads(module: CausalLMModule, batch: dict[str, Tensor]) -> tuple[Tensor, list[Tensor], int]:
    """training_step's loss, the policy's gradients, and how often the first decoder layer ran during backward (its
    recomputation; a pre-hook on its first norm, since the recompute stops once it has what backward needs)."""
    calls = []
    hook = module.policy.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        module.policy.train().zero_grad()
        loss = module.training_step(batch, 0)
        forwards = len(calls)
        loss.backward()
    finally:
        hook.remove()
    return loss.detach(), [p.grad.clone() for p in module.policy.parameters() if p.requires_grad], len(calls) - forwards


@pytest.mark.parametrize("cls", [SFTModule, DPOModule])
def test_checkpointing_gives_the_same_loss_and_gradients(cls, tiny_spec):
    plain, ckpt = (quiet(cls(policy=tiny_spec, activation_checkpointing=on)) for on in (False, True))
    assert ckpt.policy.is_activation_checkpointing and not plain.policy.is_activation_checkpointing
    batch = pairs(plain.policy.config.vocab_size)
    if cls is SFTModule:
        batch = {k: v[:3] for k, v in batch.items()}  # the chosen rows
    loss0, grads0, recomputed0 = loss_and_grads(plain, batch)
    loss1, grads1, recomputed1 = loss_and_grads(ckpt, batch)
    assert recomputed0 == 0 and recomputed1 > 0  # really recomputed in backward
    assert torch.allclose(loss0, loss1, rtol=1e-5, atol=1e-6)
    assert len(grads0) == len(grads1)
    for g0, g1 in zip(grads0, grads1):
        assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads1)


def test_checkpointing_with_a_lora_adapter_gives_the_same_gradients(tiny_spec):
    spec = {"r": 4, "alpha": 8, "dropout": 0.0}
    plain, ckpt = (quiet(SFTModule(policy=tiny_spec, adapter=spec, activation_checkpointing=on)) for on in (0, 1))
    with torch.no_grad():  # LoRA's B starts at 0: move it, so the adapter's A gets a gradient too
        for p in plain.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ckpt.policy.load_state_dict(plain.policy.state_dict())  # the same adapter weights (A's init is random)
    batch = {k: v[:3] for k, v in pairs(plain.policy.config.vocab_size).items()}
    loss0, grads0, recomputed0 = loss_and_grads(plain, batch)
    loss1, grads1, recomputed1 = loss_and_grads(ckpt, batch)
    assert recomputed0 == 0 and recomputed1 > 0 and len(grads1) == len(grads0) > 0
    assert torch.allclose(loss0, loss1, rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(grads0, grads1):
        assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads1)


def test_probe_scoring_under_checkpointing_keeps_its_kv_cache(tiny_spec):
    """Probe evaluation runs in eval mode, where checkpointing is off: the shared-prompt KV-cache path gives the
    numbers of the module without checkpointing."""
    plain, ckpt = (SFTModule(policy=tiny_spec, activation_checkpointing=on) for on in (False, True))
    gen = torch.Generator().manual_seed(3)
    vocab = plain.policy.config.vocab_size
    rows = [{"index": i, "prompt_ids": torch.randint(2, vocab, (4 + i,), generator=gen).tolist(),
             "responses": {t: torch.randint(2, vocab, (3 + i + j,), generator=gen).tolist()
                           for j, t in enumerate(("chosen", "rejected"))}} for i in range(2)]
    datamodule = SimpleNamespace(probe_types={"test": ["chosen", "rejected"]}, probe_examples={"test": rows})
    got = []
    for module in (plain, ckpt):
        module.init_probe_state(datamodule)
        module.policy.eval()
        got.append(module.probe_step("test", collate_probes(rows)))
    for t in ("chosen", "rejected"):
        for m, v in got[0][t].items():
            assert torch.allclose(v.float(), got[1][t][m].float(), rtol=1e-5, atol=1e-6), (t, m)
