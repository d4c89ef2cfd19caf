"""How much device memory a dynlab run needs, per device: the policy's weights, gradients and optimizer state, the DPO
reference, the activations and the logits, from the parameter count and the model's shape (a pure function, no
weights loaded). The README's "On GPUs" table is ``memory_table()``.

    python -m dynlab.models.memory
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dynlab.errors import InputError

Strategy = Literal["ddp", "fsdp"]
Precision = Literal["32-true", "bf16-mixed", "bf16-true"]
Optimizer = Literal["adamw", "sgd"]
Reference = Literal["live", "precomputed", "none", "adapter"]
DType = Literal["float32", "bfloat16", "float16"]

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# Saved activations per token per decoder layer, in elements of the hidden size: Korthikanti et al. 2022 ("Reducing
# Activation Recomputation in Large Transformer Models", eq. 1) count s b h (34 + 5 a s / h) bytes in 16-bit for a
# GPT layer: 17 elements of h per token (dropout masks included), plus the attention scores, which SDPA / flash
# attention never store (dropped here). Rough: a SwiGLU MLP wider than 4 h saves more, no dropout saves less.
ACTIVATION_ELEMENTS_PER_HIDDEN = 17
MOMENTS = {"adamw": 2, "sgd": 0}  # state tensors the size of the parameter (AdamW: exp_avg, exp_avg_sq)
TERMS = ("policy", "gradients", "optimizer", "reference", "activations", "logits")


def memory_estimate(n_params: int, *, strategy: Strategy = "ddp", world_size: int = 1,
                    precision: Precision = "32-true", dtype: DType = "float32", optimizer: Optimizer = "adamw",
                    reference: Reference = "live", lora_params: int | None = None, batch_tokens: int = 0,
                    response_tokens: int | None = None, hidden_size: int = 0, num_layers: int = 0,
                    vocab_size: int = 0, activation_checkpointing: bool = False,
                    logp_chunk_tokens: int | None = None) -> dict[str, int]:
    """Bytes per device of one training step, term by term (a model, not a measurement: allocator slack, the CUDA
    context, temporary buffers and autocast's transient bf16 weight copies are not counted).

    Conventions (what dynlab and Lightning do):

    - ``policy``: every parameter in its storage dtype: ``dtype`` (``ModelSpec.dtype``) under ``32-true`` and
      ``bf16-mixed`` (Lightning's bf16-mixed keeps the float32 parameters and autocasts the matmuls, so the float32
      "master copy" *is* the parameters: no extra copy), 2 bytes under ``bf16-true`` (no float32 copy anywhere).
      With ``lora_params`` the frozen base and the adapter both count.
    - ``gradients``: one per trainable parameter, in the parameter's dtype; under DDP with ``world_size > 1`` twice
      that, since DDP's reducer keeps its own flat bucket copy (``gradient_as_bucket_view=False``, the default).
    - ``optimizer``: AdamW's two moments per trainable parameter, in the parameter's dtype (float32 unless
      bf16-true); its per-tensor ``step`` scalars are not counted. ``sgd`` is plain SGD (no momentum): no state.
    - ``reference``: ``live`` = a frozen copy of the policy in the policy's dtype, whole on every device (it is
      outside the module Lightning shards, so FSDP does not shard it; DPOModule casts it to the policy's dtype, so
      under bf16-true it is 2 bytes, and to FSDP's compute dtype, so under FSDP with bf16-mixed it is 2 bytes too);
      ``precomputed``, ``none`` (SFT,
      SimPO) and ``adapter`` (the base with the LoRA adapter disabled) hold no second copy.
    - ``fsdp`` (full sharding) divides policy, gradients and optimizer state by ``world_size``; the unit gathered
      for a forward (one decoder layer, unsharded) is not counted.
    - ``activations``: ``batch_tokens x num_layers x hidden_size x 17`` elements (``ACTIVATION_ELEMENTS_PER_HIDDEN``;
      Korthikanti et al. 2022 without the attention scores, which SDPA does not store) of 4 bytes under 32-true with
      a float32 model, else 2. With ``activation_checkpointing`` only each layer's input is kept
      (``tokens x layers x hidden``) plus one layer's full set, recomputed during its backward.
    - ``logits``: dynlab projects only the response positions onto the vocabulary: the ``(response_tokens, V)``
      logits in the activation dtype, plus one ``(chunk, V)`` float32 block and its softmax
      (``2 x chunk x V x 4`` bytes) where ``chunk = logp_chunk_tokens`` (all response tokens when None).

    Args:
        n_params: parameters of the model (the base model, with an adapter).
        strategy: ``ddp`` (a whole copy per device; also one device) or ``fsdp`` (full sharding).
        world_size: devices the run spans.
        precision: the trainer's precision.
        dtype: the dtype the weights are loaded in (``model.policy.dtype``).
        optimizer: ``adamw`` or ``sgd`` (plain, no momentum).
        reference: ``live``, ``precomputed`` (cached reference log-probs), ``none`` (SFT, SimPO) or ``adapter``.
        lora_params: parameters of the LoRA adapter; then only they are trained (needs ``reference`` other than
            ``live``; LoRA under FSDP is not supported).
        batch_tokens: tokens per device per forward (every row, prompt and padding included; a DPO pair is 2 rows).
        response_tokens: tokens projected onto the vocabulary (default ``batch_tokens``).
        hidden_size: the model's hidden size.
        num_layers: decoder layers.
        vocab_size: V.
        activation_checkpointing: recompute each decoder layer in backward (``model.activation_checkpointing``).
        logp_chunk_tokens: the vocabulary-projection chunk (``model.logp_chunk_tokens``).

    Returns:
        Bytes per device for each name in ``TERMS``, and their ``total``.

    >>> memory_estimate(1000, precision="32-true", reference="none")["optimizer"]
    8000
    """
    if strategy not in ("ddp", "fsdp"):
        raise InputError(f"must be 'ddp' or 'fsdp', got {strategy!r}", field="strategy")
    if world_size < 1:
        raise InputError(f"must be at least 1, got {world_size}", field="world_size")
    if precision not in ("32-true", "bf16-mixed", "bf16-true"):
        raise InputError(f"must be '32-true', 'bf16-mixed' or 'bf16-true', got {precision!r}", field="precision")
    if dtype not in ITEMSIZE:
        raise InputError(f"must be one of {', '.join(ITEMSIZE)}, got {dtype!r}", field="dtype")
    if optimizer not in MOMENTS:
        raise InputError(f"must be 'adamw' or 'sgd', got {optimizer!r}", field="optimizer")
    if reference not in ("live", "precomputed", "none", "adapter"):
        raise InputError(f"must be 'live', 'precomputed', 'none' or 'adapter', got {reference!r}", field="reference")
    if reference == "adapter" and lora_params is None:
        raise InputError("the 'adapter' reference is the base with the LoRA adapter disabled: give lora_params",
                         field="reference")
    if lora_params is not None and reference == "live":
        raise InputError("with an adapter the reference is the base with the adapter disabled: use 'adapter', "
                         "'precomputed' or 'none'", field="reference")
    if lora_params is not None and strategy == "fsdp":
        raise InputError("a LoRA adapter under FSDP is not supported: use ddp", field="strategy")
    param_bytes = 2 if precision == "bf16-true" else ITEMSIZE[dtype]
    trainable = n_params if lora_params is None else lora_params
    shard = world_size if strategy == "fsdp" else 1
    policy = (n_params + (lora_params or 0)) * param_bytes // shard
    gradients = trainable * param_bytes // shard
    if strategy == "ddp" and world_size > 1:
        gradients *= 2  # the reducer's bucket copy
    optim = MOMENTS[optimizer] * trainable * param_bytes // shard
    # the reference follows the policy's dtype at fit start (DPOModule.on_fit_start): 2 bytes under bf16-true, and
    # under FSDP's bf16-mixed, whose compute dtype it is cast to (it runs outside FSDP's mixed-precision wrapper)
    ref_bytes = 2 if precision == "bf16-true" or (strategy == "fsdp" and precision == "bf16-mixed") else ITEMSIZE[dtype]
    ref = n_params * ref_bytes if reference == "live" else 0
    act_bytes = 4 if precision == "32-true" and ITEMSIZE[dtype] == 4 else 2
    per_layer = batch_tokens * hidden_size * ACTIVATION_ELEMENTS_PER_HIDDEN * act_bytes  # one layer's saved set
    if activation_checkpointing:
        activations = batch_tokens * hidden_size * act_bytes * num_layers + (per_layer if num_layers else 0)
    else:
        activations = per_layer * num_layers
    response = batch_tokens if response_tokens is None else response_tokens
    chunk = response if logp_chunk_tokens is None else min(logp_chunk_tokens, response)
    logits = response * vocab_size * act_bytes + 2 * chunk * vocab_size * 4
    out = {"policy": policy, "gradients": gradients, "optimizer": optim, "reference": ref,
           "activations": activations, "logits": logits}
    out["total"] = sum(out.values())
    return out


@dataclass(frozen=True)
class ModelShape:
    """What ``memory_estimate`` needs to know of a model."""

    n_params: int
    hidden_size: int
    num_layers: int
    vocab_size: int


# Parameter counts of the configs on the hub (config.json of each; counted by building the model on the meta device,
# which tests/test_memory.py redoes)
MODELS = {
    # HuggingFaceTB/SmolLM2-135M: Llama, hidden 576, 30 layers, 9/3 heads, intermediate 1536, tied embeddings
    "SmolLM2-135M": ModelShape(134_515_008, 576, 30, 49_152),
    # EleutherAI/pythia-410m: GPT-NeoX, hidden 1024, 24 layers, intermediate 4096, untied
    "Pythia-410M": ModelShape(405_334_016, 1024, 24, 50_304),
    # EleutherAI/pythia-1.4b: hidden 2048, 24 layers
    "Pythia-1.4B": ModelShape(1_414_647_808, 2048, 24, 50_304),
    # EleutherAI/pythia-2.8b: hidden 2560, 32 layers
    "Pythia-2.8B": ModelShape(2_775_208_960, 2560, 32, 50_304),
    # meta-llama/Meta-Llama-3-8B: hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256, untied
    "Llama-3-8B": ModelShape(8_030_261_248, 4096, 32, 128_256),
}


def memory_table(models: dict[str, ModelShape] | None = None, *, batch_tokens: int = 4096,
                 logp_chunk_tokens: int | None = 1024, precision: Precision = "bf16-mixed",
                 setups: tuple[tuple[str, Strategy, int], ...] = (("1 GPU", "ddp", 1), ("FSDP x8", "fsdp", 8)),
                 reference: Reference = "live") -> str:
    """The README's memory table (markdown): GiB per device of a DPO step for each model and setup, AdamW, the
    activations without and with activation checkpointing.

    Args:
        models: name -> shape (default ``MODELS``).
        batch_tokens: tokens per device per forward (e.g. 4 pairs x 2 rows x 512 tokens).
        logp_chunk_tokens: the vocabulary-projection chunk.
        precision: the trainer's precision (float32 weights loaded).
        setups: (label, strategy, world size) per column group.
        reference: the DPO reference (``live`` for DPO, ``none`` for SFT).
    """
    gib = 2**30
    lines = ["| model | setup | policy | grads | AdamW | reference | activations (ckpt) | logits | total (ckpt) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, shape in (models or MODELS).items():
        for label, strategy, world in setups:
            est = [memory_estimate(shape.n_params, strategy=strategy, world_size=world, precision=precision,
                                   reference=reference, batch_tokens=batch_tokens, hidden_size=shape.hidden_size,
                                   num_layers=shape.num_layers, vocab_size=shape.vocab_size,
                                   activation_checkpointing=ckpt, logp_chunk_tokens=logp_chunk_tokens)
                   for ckpt in (False, True)]
            cells = [f"{est[0][k] / gib:.1f}" for k in ("policy", "gradients", "optimizer", "reference")]
            cells.append(f"{est[0]['activations'] / gib:.1f} ({est[1]['activations'] / gib:.1f})")
            cells.append(f"{est[0]['logits'] / gib:.1f}")
            cells.append(f"{est[0]['total'] / gib:.1f} ({est[1]['total'] / gib:.1f})")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(memory_table())
