"""LoRA adapters through peft: the spec (``model.init_args.adapter``), its checks against the model, injecting it,
the merged weights of an adapted model (computed layer by layer, the live weights untouched), and loading an adapter
directory or a LoRA run's checkpoint back as plain merged weights (``init_from``)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dynlab.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class AdapterSpec:
    """A LoRA adapter (peft) trained instead of the full weights; the base weights stay frozen.

    Args:
        r: rank of each low-rank update.
        alpha: LoRA scaling numerator: the update is ``alpha / r * B @ A``.
        dropout: dropout on the LoRA branch's input (the base model's own dropout stays off unless model.dropout).
        target_modules: layers that get an adapter: ``all-linear`` (every linear layer but the output head), a list
            of names (a layer matches when its name equals an entry or ends in ``.entry``, e.g. ``q_proj``), or
            another string, a regex full-matched against layer names.
        modules_to_save: layers trained in full and saved with the adapter (e.g. ``lm_head``), matched as list
            entries of target_modules.
        bias: which biases train: ``none``, ``all`` or ``lora_only`` (those of adapted layers).
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"


def as_adapter_spec(value: AdapterSpec | dict | None) -> AdapterSpec | None:
    """An AdapterSpec from itself or its dict (the form a checkpoint's hyper_parameters hold)."""
    if value is None or isinstance(value, AdapterSpec):
        return value
    given = {k: v for k, v in dict(value).items() if not k.startswith("_")}
    known = {f.name for f in fields(AdapterSpec)}
    if unknown := sorted(set(given) - known):
        raise InputError(f"unknown field {unknown[0]!r}; expected some of {', '.join(sorted(known))}",
                         field=f"model.adapter.{unknown[0]}")
    return AdapterSpec(**given)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed linear


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers, in model order (``q_proj, ..., lm_head``)."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and _is_linear(m)))


def _matches(entry: str, name: str) -> bool:
    return name == entry or name.endswith(f".{entry}")  # peft's rule for a list entry


def check_adapter(spec: AdapterSpec, model: nn.Module) -> None:
    """Refuse a spec peft would reject or silently misapply to ``model``: an InputError naming the field.

    r >= 1, alpha > 0, 0 <= dropout < 1, and every ``target_modules`` / ``modules_to_save`` entry matching a layer
    of the model (the error lists the model's linear layer names).
    """
    if not isinstance(spec.r, int) or spec.r < 1:
        raise InputError(f"must be an integer of at least 1, got {spec.r!r}", field="model.adapter.r")
    if not spec.alpha > 0:
        raise InputError(f"must be positive, got {spec.alpha!r}", field="model.adapter.alpha")
    if not 0 <= spec.dropout < 1:
        raise InputError(f"must be in [0, 1), got {spec.dropout!r}", field="model.adapter.dropout")
    names = [name for name, _ in model.named_modules() if name]
    linear = ", ".join(linear_layer_names(model))
    targets = spec.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise InputError(f"not a valid regex ({err})", field="model.adapter.target_modules") from None
        if not any(pattern.fullmatch(n) for n in names):
            raise InputError(f"the regex {targets!r} matches no layer of the model; its linear layers: {linear}",
                             field="model.adapter.target_modules")
    if isinstance(targets, list) and not targets:
        raise InputError(f"names no layer; the model's linear layers: {linear}", field="model.adapter.target_modules")
    for field, entries in (("target_modules", targets if isinstance(targets, list) else []),
                           ("modules_to_save", spec.modules_to_save or [])):
        missing = [e for e in entries if not any(_matches(e, n) for n in names)]
        if missing:
            raise InputError(f"the model has no layer {', '.join(map(repr, missing))}; its linear layers: {linear}",
                             field=f"model.adapter.{field}")
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        # a trained head (or its delta) would be exported beside embeddings the config ties it to: a reload re-ties
        # them and drops it, while merge_and_unload would shift the shared embedding matrix instead
        tied = {n for n, m in model.named_modules() if n and m in (model.get_output_embeddings(),
                                                                   model.get_input_embeddings())}
        regex = re.compile(targets) if isinstance(targets, str) and targets != "all-linear" else None
        for field, entries in (("target_modules", targets if isinstance(targets, list) else []),
                               ("modules_to_save", spec.modules_to_save or [])):
            hit = [e for e in entries if any(_matches(e, n) for n in tied)]
            if field == "target_modules" and regex is not None:
                hit += [n for n in tied if regex.fullmatch(n)]
            if hit:
                raise InputError(f"{', '.join(map(repr, hit))} is the output head tied to the input embeddings "
                                 "(tie_word_embeddings): an adapter on it cannot be exported as a plain model; "
                                 "leave it out", field=f"model.adapter.{field}")


def apply_adapter(model: nn.Module, spec: AdapterSpec, base_name: str | None = None) -> Any:
    """``model`` with a fresh LoRA adapter injected (in place): the ``PeftModel`` around it.

    Only the LoRA parameters (and modules_to_save, and the biases ``bias`` names) keep ``requires_grad``. The
    adapter's A matrices are drawn from torch's global generator (seeded by ``seed_everything``); B starts at 0,
    so the adapted model computes what the base does. ``base_name`` is recorded as the adapter's
    ``base_model_name_or_path``.
    """
    from peft import LoraConfig, get_peft_model

    check_adapter(spec, model)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, modules_to_save=spec.modules_to_save, bias=spec.bias,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if base_name is not None:
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = base_name
    return peft_model


@torch.no_grad()
def merged_state_dict(peft_model: Any) -> dict[str, Tensor]:
    """The plain model's state dict with the active LoRA adapter merged, one layer at a time.

    ``base_layer.weight + get_delta_weight(adapter)`` under the plain name, the ``lora_*`` entries dropped, and a
    modules_to_save copy in place of its original. Nothing is deep-copied and nothing merged in place: the live
    weights keep no rounding. Unadapted entries are the live tensors themselves (tied weights stay tied).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    adapter = peft_model.active_adapter
    base = peft_model.get_base_model()
    wrapped: dict[str, nn.Module] = {name: m for name, m in base.named_modules()
                                     if isinstance(m, (LoraLayer, ModulesToSaveWrapper))}
    out: dict[str, Tensor] = {}
    for key, value in base.state_dict().items():
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in wrapped),
                     None)
        if owner is None:
            out[key] = value
            continue
        module, rest = wrapped[owner], key[len(owner) + 1:]
        if isinstance(module, ModulesToSaveWrapper):
            prefix = f"modules_to_save.{adapter}."
            if rest.startswith(prefix):
                out[f"{owner}.{rest.removeprefix(prefix)}"] = value
            continue  # original_module.*: replaced by the trained copy
        if not rest.startswith("base_layer."):
            continue  # lora_A, lora_B, ...: merged below
        rest = rest.removeprefix("base_layer.")
        if rest == "weight" and adapter in module.lora_A:
            value = value + module.get_delta_weight(adapter).to(value.dtype)
        out[f"{owner}.{rest}"] = value
    return out


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a peft adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def recorded_base(path: str | Path) -> str | None:
    """The ``base_model_name_or_path`` an adapter directory's config records."""
    try:
        return json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read it ({err})", file=str(Path(path) / ADAPTER_CONFIG),
                         field="model.init_from") from err


def merge_adapter_dir(base: nn.Module, path: str | Path, configured: str | None = None) -> nn.Module:
    """``base`` with the adapter in ``path`` loaded and merged: a plain model (no LoRA layers left).

    A mismatch (shapes, layers the base lacks) is one InputError naming the file and the base the adapter records
    (the policy to configure when ``configured``, the configured one, differs).
    """
    from peft import PeftModel

    recorded = recorded_base(path)
    try:
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except Exception as err:  # shape mismatches (RuntimeError), missing target modules (ValueError), bad files, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        hint = ""
        if recorded and recorded != configured:
            hint = (f"; the adapter was trained on {recorded!r}, the policy is {configured!r}: set "
                    f"model.init_args.policy.name_or_path={recorded}")
        elif recorded:
            hint = f"; the adapter records its base as {recorded!r}"
        raise InputError(f"the adapter does not fit the model ({reason}){hint}", file=str(Path(path) / ADAPTER_CONFIG),
                         field="model.init_from") from err


def merge_lora_checkpoint(base: nn.Module, policy_state: dict[str, Tensor], adapter: AdapterSpec | dict,
                          path: str) -> nn.Module:
    """``base`` with a LoRA run's checkpointed policy weights (``base_layer``/``lora_*`` keys) loaded and merged."""
    spec = as_adapter_spec(adapter)
    assert spec is not None
    try:
        peft_model = apply_adapter(base, spec)
    except InputError as err:
        raise InputError(f"the checkpoint's adapter does not fit the model ({err.message})", file=path,
                         field="model.init_from") from None
    injected = peft_model.get_base_model()
    missing, unexpected = injected.load_state_dict(policy_state, strict=False)
    tied = getattr(injected.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and tied)]
    if missing or unexpected:
        raise InputError(f"checkpoint does not match the model with its adapter {asdict(spec)} (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})", file=path, field="model.init_from")
    return peft_model.merge_and_unload()
