"""LoRA (peft) through the real CLI on the tiny model: only the adapter trains, DPO's reference is the base with the
adapter disabled (one copy of the base weights), both exports load back, init_from takes each of them, the merged
weights equal peft's merge_and_unload, bad adapter specs are refused, and the dynamics run over the LoRA parameters."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from dynlab.cli import main
from dynlab.dynamics.influence import directional_change, gradient_similarity, pack, sequence_logps
from dynlab.errors import InputError
from dynlab.models.adapter import AdapterSpec, apply_adapter, check_adapter, merged_state_dict
from dynlab.models.load import ModelSpec, load_model, tiny_model
from tests.conftest import CONFIGS
from tests.test_modules import probe_rows, read_metrics

TINY = ModelSpec(name_or_path="tiny")
LORA = str(CONFIGS / "lora.yaml")
# two pairs sharing their prompt (DPO's shared-prompt path), as DPO batches them: chosen rows, then rejected rows
PAIRS = pack([([2, 5, 7, 9], [11, 12, 13]), ([2, 5, 7, 9], [30, 31]), ([2, 5, 7, 9], [40, 41, 42, 43]),
              ([2, 5, 7, 9], [50, 51, 52])])


def fit(stage: str, *extra: str) -> Path:
    main(["fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--config", str(CONFIGS / "tiny.yaml"), "--config", LORA,
          "--trainer.max_steps=3", "--model.init_args.optimizer.init_args.lr=1e-2", *extra])
    runs = sorted(Path("runs", stage).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return runs[-1].resolve()


@pytest.fixture(scope="module")
def runs(module_tmp) -> SimpleNamespace:
    """An SFT-LoRA run, and a DPO-LoRA run started from its adapter directory (the chain)."""
    cwd = Path.cwd()
    os.chdir(module_tmp("lora"))
    try:
        sft = fit("sft")
        # the cached reference log-probs come from the adapter-disabled policy too (the live path: the dynamics fit)
        dpo = fit("dpo", f"--model.init_args.init_from={sft / 'adapter'}",
                  "--model.init_args.precompute_ref_logps=true")
    finally:
        os.chdir(cwd)
    return SimpleNamespace(sft=sft, dpo=dpo)


def policy_state(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}


def logps(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model.eval(), PAIRS)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_only_the_adapter_trains(stage, runs):
    run = getattr(runs, stage)
    start = (tiny_model(TINY) if stage == "sft" else load_model(TINY, str(runs.sft / "adapter"))).state_dict()
    state = policy_state(run)
    lora = [k for k in state if ".lora_" in k]
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    for key, value in state.items():
        if ".lora_" not in key:  # every base weight bitwise as it started
            assert torch.equal(value, start[key.replace(".base_layer.", ".")]), key
    assert all(state[k].abs().sum() > 0 for k in lora if ".lora_B." in k)  # B starts at 0: it moved
    rows = read_metrics(run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    probes = probe_rows(rows)
    assert sorted(probes) == [0, 3] and probes[0]["probe/train/dlogp/chosen"] == 0.0
    assert math.isfinite(probes[3]["probe/test/logp/rejected"])
    if stage == "dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # reference = policy at step 0
        assert probes[0]["probe/train/reward_margin"] == 0.0


@pytest.mark.parametrize("stage", ["sft", "extend_sft", "dpo"])
def test_the_lora_overlay_stacks_on_every_stage(stage, capsys):
    import yaml

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--config", LORA, "--print_config"])
    assert exit_.value.code in (0, None)
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init["adapter"] == {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear",
                               "modules_to_save": None, "bias": "none"}
    assert init["optimizer"]["init_args"]["lr"] == yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())[
        "model"]["init_args"]["optimizer"]["init_args"]["lr"]  # the overlay leaves the learning rate alone


def dpo_module(init_from: str | None = None):
    from dynlab.modules import DPOModule

    return DPOModule(policy=TINY, init_from=init_from, adapter=AdapterSpec(r=4, alpha=8))


def test_dpo_reference_is_the_base_with_the_adapter_disabled_and_the_base_is_in_memory_once(runs):
    module = dpo_module()
    torch.testing.assert_close(module.reference_sequence_logps(PAIRS), module.sequence_logps(PAIRS), rtol=0, atol=0)
    assert not module._reference
    # one storage per base weight: the module's tensors, the PeftModel's and the reference path's are the same
    storages = {t.untyped_storage().data_ptr() for m in (module, module.peft_model) for t in m.state_dict().values()}
    plain = {t.untyped_storage().data_ptr() for t in tiny_model(TINY).state_dict().values()}
    assert len(storages) == len(plain) + len([k for k in module.state_dict() if ".lora_" in k])
    # the trained DPO run: its checkpoint loads strictly into a rebuilt module (resume); the reference is the SFT
    # result it started from, the policy its export
    module = type(module)(policy=TINY, init_from=str(runs.sft / "adapter"), adapter=AdapterSpec())  # lora.yaml's
    module.load_state_dict(torch.load(runs.dpo / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    module.train()
    reference = module.reference_sequence_logps(PAIRS)
    assert module.policy.training  # train mode restored
    with torch.no_grad():  # the same computation on a freshly loaded base
        fresh = module.sequence_logps(PAIRS, load_model(TINY, str(runs.sft / "export")).eval())
    torch.testing.assert_close(reference, fresh, rtol=0, atol=1e-6)
    policy = logps(module.policy)
    assert not torch.allclose(policy, reference, atol=1e-3)
    torch.testing.assert_close(policy, logps(AutoModelForCausalLM.from_pretrained(runs.dpo / "export")), rtol=0,
                               atol=1e-5)


def test_exports_load_with_plain_transformers_and_with_peft(runs):
    from peft import PeftModel

    trained = tiny_model(TINY)
    apply_adapter(trained, AdapterSpec()).get_base_model().load_state_dict(policy_state(runs.sft))
    expected = logps(trained)
    merged = AutoModelForCausalLM.from_pretrained(runs.sft / "export")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logps(merged), expected, rtol=0, atol=1e-5)
    adapter = PeftModel.from_pretrained(tiny_model(TINY), runs.sft / "adapter")
    torch.testing.assert_close(logps(adapter.get_base_model()), expected, rtol=0, atol=1e-5)
    assert (runs.sft / "adapter" / "tokenizer.json").is_file()
    config = json.loads((runs.dpo / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(runs.sft / "adapter")  # what DPO's adapter applies to


def test_init_from_adapter_export_and_checkpoint_agree(runs):
    starts = [load_model(TINY, str(runs.sft / name)).state_dict()
              for name in ("adapter", "export", "checkpoints/last.ckpt")]
    for state in starts[1:]:
        assert state.keys() == starts[0].keys()
        for key in state:
            torch.testing.assert_close(state[key], starts[0][key], rtol=0, atol=1e-6)
    # the DPO adapter's recorded base is the SFT adapter: loading it chains the two
    torch.testing.assert_close(logps(load_model(TINY, str(runs.dpo / "adapter"))),
                               logps(load_model(TINY, str(runs.dpo / "export"))), rtol=0, atol=1e-5)


def test_an_adapter_that_does_not_fit_names_the_base_to_configure(runs, tmp_path):
    import shutil

    other = ModelSpec(name_or_path="tiny", tiny_config={"hidden_size": 32, "intermediate_size": 64})
    with pytest.raises(InputError, match="adapter_config.json: field 'model.init_from': the adapter does not fit"):
        load_model(other, str(runs.sft / "adapter"))
    moved = shutil.copytree(runs.sft / "adapter", tmp_path / "adapter")
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/base"}))
    with pytest.raises(InputError, match="trained on 'org/base', the policy is 'tiny': set "
                                         "model.init_args.policy.name_or_path=org/base"):
        load_model(other, str(moved))


@pytest.mark.parametrize("spec", [AdapterSpec(r=4, alpha=8),
                                  AdapterSpec(r=2, alpha=3, target_modules=["q_proj", "v_proj"],
                                              modules_to_save=["lm_head"], bias="all")])
def test_merged_state_dict_is_merge_and_unload(spec):
    model = tiny_model(ModelSpec(name_or_path="tiny", tiny_config={"tie_word_embeddings": False}))
    peft_model = apply_adapter(model, spec)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:  # as if trained
                p.add_(torch.randn_like(p) * 0.1)
    live = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = merged_state_dict(peft_model)
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key
    assert all(torch.equal(v, live[k]) for k, v in peft_model.state_dict().items())  # nothing merged in place


@pytest.mark.parametrize(("spec", "field", "says"), [
    (AdapterSpec(target_modules=["q_proj", "not_a_layer"]), "target_modules",
     "no layer 'not_a_layer'; its linear layers: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "
     "lm_head"),
    (AdapterSpec(target_modules="foo.*bar"), "target_modules", "matches no layer"),
    (AdapterSpec(modules_to_save=["head"]), "modules_to_save", "no layer 'head'"),
    (AdapterSpec(r=0), "r", "at least 1"),
    (AdapterSpec(alpha=0.0), "alpha", "positive"),
    (AdapterSpec(dropout=1.0), "dropout", "[0, 1)"),
])
def test_bad_adapter_specs_are_refused_naming_the_field(spec, field, says):
    with pytest.raises(InputError, match=f"field 'model.adapter.{field}'") as err:
        check_adapter(spec, tiny_model(TINY))
    assert says in str(err.value)


@pytest.mark.parametrize("spec", [AdapterSpec(target_modules=["q_proj", "lm_head"]),
                                  AdapterSpec(target_modules="lm_head"), AdapterSpec(modules_to_save=["lm_head"])])
def test_an_adapter_on_a_tied_head_is_refused(spec):
    # the tiny model ties lm_head to embed_tokens: a trained head could not be exported as a plain model
    with pytest.raises(InputError, match="tied to the input embeddings"):
        check_adapter(spec, tiny_model(TINY))
    untied = tiny_model(ModelSpec(name_or_path="tiny", tiny_config={"tie_word_embeddings": False}))
    check_adapter(spec, untied)


def test_unknown_adapter_and_sampling_fields_name_the_field():
    from dynlab.models.adapter import as_adapter_spec
    from dynlab.models.sampling import as_sampling_spec

    with pytest.raises(InputError, match="model.adapter.rank"):
        as_adapter_spec({"rank": 8})
    with pytest.raises(InputError, match="model.sampling.temp"):
        as_sampling_spec({"temp": 0.7})


def test_dpo_refuses_an_adapter_that_trains_the_base_biases():
    from dynlab.modules import DPOModule

    # peft's bias "all"/"lora_only" trains the base's own biases, which disable_adapter() keeps: a moving reference
    with pytest.raises(InputError, match="model.adapter.bias"):
        DPOModule(policy=TINY, adapter=AdapterSpec(bias="all"))
    DPOModule(policy=TINY, adapter=AdapterSpec(bias="all"), precompute_ref_logps=True)  # taken once, before training


def test_bad_adapter_through_the_cli_and_under_fsdp(in_tmp, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "tiny.yaml"), "--config", LORA,
              "--model.init_args.adapter.target_modules=[not_a_layer]"])
    assert "model.adapter.target_modules" in capsys.readouterr().err
    module = dpo_module()
    fsdp = SimpleNamespace(strategy=type("FSDPStrategy", (), {})())
    with pytest.raises(InputError, match="LoRA adapter under FSDP"):
        module.check_strategy(fsdp)


def test_dynamics_run_over_the_lora_parameters():
    peft_model = apply_adapter(tiny_model(TINY).double(), AdapterSpec(r=4, alpha=8))
    model = peft_model.get_base_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, _ in trainable)
    direction = {n: torch.randn_like(p) for n, p in trainable}
    change = directional_change(model, PAIRS, direction)
    for b in range(2):
        grads = torch.autograd.grad(sequence_logps(model, PAIRS)[b], [p for _, p in trainable])
        expected = sum((g * direction[n]).sum() for g, (n, _) in zip(grads, trainable))
        torch.testing.assert_close(change[b], expected, rtol=1e-6, atol=1e-8)
    responses = {"a": [10, 11, 12], "same_as_a": [10, 11, 12], "b": [40, 41, 42, 43]}
    names, cosine = gradient_similarity(model, [2, 5, 6], responses)
    assert names == list(responses) and cosine[0, 1] == pytest.approx(1.0, abs=1e-5) and abs(cosine[0, 2]) < 0.999


def test_dynamics_callback_in_a_lora_fit(in_tmp):
    from dynlab.tracking.trajectory import read_trajectory

    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"), "--config", LORA,
          "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.callbacks+=dynlab.dynamics.DynamicsCallback",
          "--trainer.callbacks.num_examples=2", "--trainer.callbacks.every_n_steps=2",
          "--model.init_args.probe_every_n_steps=2", "--model.init_args.optimizer.init_args.lr=1e-3"])
    run = next(in_tmp.glob("**/probes/trajectory")).parents[1]
    dyn = read_trajectory(run).dropna(subset=["dyn_observed"])
    assert sorted(dyn["step"].unique()) == [0, 2]
    assert dyn[["dyn_observed", "dyn_predicted"]].corr().iloc[0, 1] > 0.9
