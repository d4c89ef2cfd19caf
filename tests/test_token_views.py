"""Per-token views of probe responses (``model.probe_token_examples``): RUN_DIR/tokens against the trajectory's
sequence log-probs, the step-0 baseline kept through a resume, the implicit reward against a plain forward of the
reference model, and the two figures ``dynlab plot`` draws from them, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml

from dynlab.cli import DynlabCLI, main
from dynlab.errors import InputError
from dynlab.models.load import ModelSpec
from dynlab.modules import DPOModule
from dynlab.tracking.plots import strip_layout
from dynlab.tracking.trajectory import TOKENS_DIR, read_tokens, read_trajectory
from tests.conftest import CONFIGS

CONFIG_ARGS = ["--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
K = 2


@pytest.fixture(scope="module")
def resumed_run(module_tmp) -> Path:
    """A tiny DPO fit of 3 steps, resumed from its step-3 checkpoint to step 6 (evaluations at 0, 3 and 6): the second
    process never evaluates step 0, so its step-6 Δlog π can only come from the checkpointed token baseline."""
    root = module_tmp("tokens")
    args = ["fit", *CONFIG_ARGS, "--ckpt_path=last", f"--model.init_args.probe_token_examples={K}",
            '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            '"init_args": {"every_n_train_steps": 3, "save_top_k": -1}}]']
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("DYNLAB_RUN_VERSION", "resumed")
        main([*args, "--trainer.max_steps=3"])
        main([*args, "--trainer.max_steps=6"])
    return root / "runs" / "dpo" / "resumed"


def beta_of(run: Path) -> float:
    return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["model"]["init_args"]["beta"]


def by_key(frame, step: int) -> dict[tuple[str, int, str], object]:
    return {(r.split, r.row, r.type): r for r in frame[frame["step"] == step].itertuples()}


def test_every_evaluation_keeps_the_first_rows_of_each_split_every_type(resumed_run):
    assert sorted(p.name for p in (resumed_run / TOKENS_DIR).glob("*.parquet")) == \
        [f"step_{s:08d}.parquet" for s in (0, 3, 6)]
    tokens, trajectory = read_tokens(resumed_run), read_trajectory(resumed_run)
    for split in ("train", "test"):
        types = sorted(set(trajectory.loc[trajectory["split"] == split, "type"]))
        for step in (0, 3, 6):
            sub = tokens[(tokens["step"] == step) & (tokens["split"] == split)]
            assert sorted(zip(sub["row"], sub["type"])) == sorted((r, t) for r in range(K) for t in types)


def test_per_token_logp_sums_to_the_sequence_logp_and_dlogp_is_since_step_0(resumed_run):
    tokens, trajectory = read_tokens(resumed_run), read_trajectory(resumed_run)
    sequence = trajectory.set_index(["step", "split", "row", "type"])["logp"]
    for r in tokens.itertuples():
        want = sequence.loc[(r.step, r.split, r.row, r.type)]
        assert abs(np.sum(r.logp, dtype=np.float64) - want) <= 1e-5 * abs(want), (r.step, r.split, r.row, r.type)
        assert r.dlogp is not None and r.reward is not None, (r.step, r.split, r.row, r.type)
        assert len(r.token_ids) == len(r.tokens) == len(r.logp) == len(r.dlogp) == len(r.reward)
    start = by_key(tokens, 0)
    for key, r in start.items():
        assert (r.dlogp == 0).all()
    for step in (3, 6):  # step 6 was evaluated by the resumed process: its baseline is the checkpoint's
        for key, r in by_key(tokens, step).items():
            assert (r.token_ids == start[key].token_ids).all()
            np.testing.assert_allclose(r.dlogp, r.logp - start[key].logp, rtol=0, atol=1e-6)
        assert any(np.abs(r.dlogp).max() > 1e-3 for r in by_key(tokens, step).values())  # training moved them
    ckpt = torch.load(next((resumed_run / "checkpoints").glob("*step=6.ckpt")), map_location="cpu",
                      weights_only=False)
    saved = ckpt["dynlab_token_baseline"]
    assert {(split, row, t) for split, b in saved.items() for row, t in b} == set(start)
    for (split, row, t), r in start.items():
        np.testing.assert_array_equal(saved[split][(row, t)].numpy(), r.logp)


@torch.no_grad()
def brute_token_logps(model, prompt: list[int], response: list[int]) -> np.ndarray:
    """log pi(y_t | x, y_<t) of every response token from one plain forward of prompt + response. (L,)"""
    logits = model(input_ids=torch.tensor(prompt + response)[None]).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None]).squeeze(1).numpy()


def test_reward_is_beta_times_logp_minus_the_reference_models_own(resumed_run):
    cli = DynlabCLI(args=CONFIG_ARGS, run=False)  # the same initial weights (the reference) and probe rows, rebuilt
    module, dm = cli.model, cli.datamodule
    dm.prepare(module.tokenizer, module.training_view, module.generate)
    beta = beta_of(resumed_run)
    tokens = read_tokens(resumed_run)
    for step in (0, 6):
        for (split, row, ptype), r in by_key(tokens, step).items():
            example = dm.probe_examples[split][row]
            assert r.token_ids.tolist() == list(example["responses"][ptype])
            decode = module.tokenizer.decode
            assert list(r.tokens) == [decode([i], clean_up_tokenization_spaces=False) for i in r.token_ids]
            ref = brute_token_logps(module.reference, list(example["prompt_ids"]), r.token_ids.tolist())
            np.testing.assert_allclose(r.reward, beta * (r.logp - ref), rtol=0, atol=2e-6)
            if step == 0:  # the reference is the initial policy
                np.testing.assert_allclose(r.reward, 0, atol=2e-6)


def test_dynlab_plot_draws_the_token_strips_and_the_ches_scatter(resumed_run, tmp_path, capsys):
    out = tmp_path / "figs"
    main(["plot", str(resumed_run), "--out", str(out)])
    printed = {Path(p).name for p in capsys.readouterr().out.split()}
    want = {"tokens_train.png", "tokens_test.png", "ches_vs_dlogp_train.png", "ches_vs_dlogp_test.png"}
    assert want <= printed and want <= {p.name for p in (resumed_run / "figures").glob("*.png")}
    for name in want:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert (image[..., :3] < 0.9).mean() > 0.02  # text and coloured boxes, not a blank canvas


def test_strip_layout_wraps_between_tokens_and_after_newlines():
    layout = strip_layout([" ab", "cd", "\n", " efgh", "ij"], width=6)
    assert layout == [(0, 0, " ab"), (0, 3, "cd"), (0, 5, "↵"), (1, 0, " efgh"), (2, 0, "ij")]
    assert strip_layout(["x" * 9], width=6) == [(0, 0, "x" * 6)]  # longer than a line: cut to it


def test_k_0_keeps_no_token_views(in_tmp):
    main(["fit", *CONFIG_ARGS, "--model.init_args.probe_token_examples=0", "--trainer.max_steps=1"])
    run = next(Path("runs", "dpo").glob("version_*"))
    assert len(read_trajectory(run)) and not (run / TOKENS_DIR).exists()
    assert not list((run / "figures").glob("tokens_*.png"))


def test_a_negative_k_is_refused_naming_the_field(in_tmp, capsys):
    with pytest.raises(InputError, match="model.probe_token_examples"):
        DPOModule(policy=ModelSpec(name_or_path="tiny"), probe_token_examples=-1)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *CONFIG_ARGS, "--model.init_args.probe_token_examples=-1"])
    assert exit_.value.code == 2 and "model.probe_token_examples" in capsys.readouterr().err
    assert not Path("runs").exists()


def test_with_cached_reference_logps_the_reward_is_against_the_step_0_policy(in_tmp):
    main(["fit", *CONFIG_ARGS, "--model.init_args.precompute_ref_logps=true", "--trainer.max_steps=3"])
    run = next(Path("runs", "dpo").glob("version_*"))
    tokens = read_tokens(run)
    beta = beta_of(run)
    last = tokens[tokens["step"] == 3]
    assert len(last)
    for r in last.itertuples():
        np.testing.assert_allclose(r.reward, beta * r.dlogp, rtol=1e-6, atol=1e-7)
