"""The ``dynlab`` command: LightningCLI for fit/validate/test, plus thin extra subcommands.

    dynlab fit --config configs/dpo.yaml [--config configs/tiny.yaml] [--model.init_args.beta=0.2 ...]
    dynlab fit --config configs/dpo.yaml --print_config
    dynlab plot RUN_DIR [RUN_DIR ...] --out DIR
    dynlab probe build --source synthetic --split test --size 100 --out probe_test.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from dynlab.data.datamodule import ProbeDataModule
from dynlab.errors import InputError
from dynlab.modules.base import CausalLMModule


class SaveAndLogConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run directory and log it whole to W&B (rank 0)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(self.config.as_dict())


class DynlabCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with OmegaConf interpolation in configs."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True):
        super().__init__(
            CausalLMModule,
            ProbeDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def _prepare_data(self) -> None:
        # read, validate and tokenize all data now, so bad input fails before the run directory is written
        hp, trainer = self.datamodule.hparams, self.trainer
        if hp.rephraser and trainer.world_size > 1:  # each rank would draw its own, different rephrases
            raise InputError("build rephrased probes once (dynlab probe build --rephraser ... --out FILE) and pass "
                             "the file as data.probe_train_file / data.probe_test_file for multi-process runs",
                             field="data.rephraser")
        if self.subcommand == "fit" and self.config[self.subcommand].get("ckpt_path"):
            # a resumed run scores exactly the probe texts it started with (sampled or rephrased ones included)
            for split in ("train", "test"):
                saved = Path(trainer.log_dir or ".", "probes", f"probe_{split}.jsonl")
                if saved.is_file():
                    hp[f"probe_{split}_file"] = str(saved)
        self.datamodule.prepare(self.model.tokenizer, self.model.training_view, self.model.generate)

    before_fit = before_validate = before_test = _prepare_data

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = newest_checkpoint(self.trainer) or "last"
        return kwargs

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(f"dynlab: run directory: {self.model.run_dir}  (metrics.csv, config.yaml, probes/, figures/, "
                  "checkpoints/, export/)")
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger) and logger.experiment.settings.mode == "offline":
                    print(f"dynlab: W&B offline run: {logger.experiment.dir.removesuffix('/files')}  "
                          "(upload: wandb sync DIR)")
        self._finish_wandb()

    def _finish_wandb(self) -> None:
        # flush everything (the figures come last), and leave no run open for a next CLI call in the same process
        # (W&B would attach that call to this run)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()

    after_validate = after_test = _finish_wandb


def plot_command(argv: Sequence[str]) -> None:
    """``dynlab plot``: paper-style PNG figures from one or more runs' probe trajectories."""
    parser = argparse.ArgumentParser(prog="dynlab plot", description=plot_command.__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (runs/<stage>/version_N)")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    args = parser.parse_args(argv)
    from dynlab.tracking.plots import plot_runs

    try:
        written = plot_runs(args.runs, args.out)
    except FileNotFoundError as err:
        raise InputError(str(err)) from err
    for path in written:
        print(path)


def probe_command(argv: Sequence[str]) -> None:
    """``dynlab probe build``: write a probe set in the paper's probe jsonl format from any preference source."""
    parser = argparse.ArgumentParser(prog="dynlab probe", description=probe_command.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build a probe split and write it as jsonl")
    build.add_argument("--source", default="synthetic", help="synthetic, a local file, or a hub dataset id")
    build.add_argument("--split", choices=["train", "test"], default="test",
                       help="probe_train (training prompts) or probe_test (held-out prompts)")
    build.add_argument("--dataset-split", default="train", help="split of a hub dataset to read")
    build.add_argument("--heldout-split", default=None, help="hub split holding held-out prompts")
    build.add_argument("--config-name", default=None)
    build.add_argument("--data-dir", default=None)
    build.add_argument("--format", default="auto", choices=["auto", "hh", "chat", "flat", "probe"])
    build.add_argument("--num-train", type=int, default=256, help="training rows (irr_train pool)")
    build.add_argument("--num-heldout", type=int, default=64, help="held-out rows (probe_test, irr_test pool)")
    build.add_argument("--size", type=int, default=32, help="probe prompts")
    build.add_argument("--types", nargs="*", default=None, help="probe types (default: every buildable type)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--rephraser", default=None,
                       help="hf:PATH_OR_ID or openai:BASE_URL@MODEL[#API_KEY_ENV] for the rephrase types")
    build.add_argument("--initial-model", default=None,
                       help="sample chosen_initial from this model (a ModelSpec name_or_path)")
    build.add_argument("--out", required=True, help="output .jsonl")
    args = parser.parse_args(argv)
    from dynlab.data.datamodule import ProbeDataModule
    from dynlab.tracking.trajectory import write_jsonl

    dm = ProbeDataModule(source=args.source, split=args.dataset_split, heldout_split=args.heldout_split,
                         config_name=args.config_name, data_dir=args.data_dir, format=args.format,
                         num_train=args.num_train, num_heldout=args.num_heldout, probe_size=args.size,
                         probe_types=args.types, seed=args.seed, rephraser=args.rephraser,
                         sample_chosen_initial=args.initial_model is not None)
    tokenizer, generate = None, None
    if args.initial_model is not None:
        from dynlab.models.generate import generate_responses
        from dynlab.models.load import ModelSpec, load_model, load_tokenizer

        spec = ModelSpec(name_or_path=args.initial_model)
        tokenizer, model = load_tokenizer(spec), load_model(spec)

        def generate(prompts, **kwargs):
            return generate_responses(model, tokenizer, prompts, **kwargs)

    rows = dm.build_probe_sets(tokenizer, generate=generate, splits=[args.split])[args.split]
    out = write_jsonl(args.out, rows)
    print(f"{out}: {len(rows)} rows, types {[t for t in rows[0] if t != 'prompt'] if rows else []}")


def sweep_command(argv: Sequence[str]) -> None:
    """``dynlab sweep``: run a W&B sweep YAML locally (no W&B server) with W&B's open-source sweep engine."""
    parser = argparse.ArgumentParser(prog="dynlab sweep", description=sweep_command.__doc__)
    parser.add_argument("sweep", help="a sweep YAML, e.g. sweeps/dpo_lr_epochs.yaml")
    parser.add_argument("--count", type=int, required=True, help="total trials (finished ones from before count)")
    parser.add_argument("--config", action="append", default=[], help="overlay config(s) for every trial")
    parser.add_argument("--out", default=None, help="summary directory (default runs/sweeps/<sweep name>)")
    args = parser.parse_args(argv)
    from dynlab.sweep import run_sweep

    run_sweep(args.sweep, args.count, overlays=args.config, out_dir=args.out)


def slurm_command(argv: Sequence[str]) -> None:
    """``dynlab slurm``: write (and with --submit, submit) an sbatch script running ``dynlab fit`` on Slurm."""
    args_, fit = (list(argv), []) if "--" not in argv else (list(argv[: argv.index("--")]),
                                                            list(argv[argv.index("--") + 1:]))
    usage = "dynlab slurm --nodes N --gpus-per-node G [options] -- fit --config FILE ..."
    parser = argparse.ArgumentParser(prog="dynlab slurm", description=slurm_command.__doc__, usage=usage)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="0 for CPU nodes (see --tasks-per-node)")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="CPU processes per node when no GPUs")
    parser.add_argument("--time", default=None, help="e.g. 04:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--mem", default=None)
    parser.add_argument("--job-name", default="dynlab")
    parser.add_argument("--workdir", default=None, help="directory the job runs in (default: where sbatch runs)")
    parser.add_argument("--setup", action="append", default=[], help="a shell line before srun (module load ...)")
    parser.add_argument("--out", default="dynlab.sbatch", help="where to write the script")
    parser.add_argument("--submit", action="store_true", help="sbatch the script and print the job id")
    args = parser.parse_args(args_)
    from dynlab.slurm import sbatch_script, submit

    script = sbatch_script(fit, nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
                           partition=args.partition, account=args.account, job_name=args.job_name,
                           cpus_per_task=args.cpus_per_task, mem=args.mem, tasks_per_node=args.tasks_per_node,
                           workdir=args.workdir, setup=args.setup)
    out = Path(args.out)
    out.write_text(script)
    out.chmod(0o755)
    print(f"dynlab: wrote {out}")
    if args.submit:
        print(f"dynlab: submitted job {submit(out)}")


def _lazy(module: str, name: str):
    """A subcommand whose implementation lives outside this file, imported only when it runs."""
    def command(argv: Sequence[str]) -> None:
        return getattr(importlib.import_module(module), name)(argv)
    return command


SUBCOMMANDS = {"plot": plot_command, "probe": probe_command, "sweep": sweep_command, "slurm": slurm_command,
               "toy": _lazy("dynlab.dynamics.toy_cli", "toy_command"),
               "generate": _lazy("dynlab.evaluation.cli", "generate_command"),
               "judge": _lazy("dynlab.evaluation.cli", "judge_command")}


def newest_checkpoint(trainer: Trainer) -> str | None:
    """For ``--ckpt_path=last``: the newest of the run's checkpoints and Lightning's Slurm pre-emption checkpoints
    (``hpc_ckpt_*.ckpt`` in ``default_root_dir``, saved on SIGUSR1), so a requeued job loses no steps."""
    candidates = [*Path(trainer.log_dir or ".", "checkpoints").glob("*.ckpt"),
                  *Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")]
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``dynlab`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        try:
            SUBCOMMANDS[args[0]](args[1:])
        except InputError as err:
            print(f"dynlab: error: {err}", file=sys.stderr)
            sys.exit(2)
        return
    # W&B offline unless the user chose a mode or gave a key (offline runs sync later with `wandb sync`)
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    # called with explicit args from Python (tests, sweeps), sys.argv belongs to the caller
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # Lightning's hint for machines that have srun installed but run dynlab outside Slurm: noise here
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
    # during fit the probe loaders are run by the module itself, so Lightning's validation loader list is empty
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    try:
        DynlabCLI(args=None if argv is None else list(argv))
    except Exception as exc:
        err = _input_error(exc)
        if err is None:
            raise
        print(f"dynlab: error: {err}", file=sys.stderr)
        sys.exit(2)


def _input_error(exc: BaseException | None) -> InputError | None:
    """The InputError behind ``exc``: jsonargparse wraps errors raised while it instantiates the classes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    main()
