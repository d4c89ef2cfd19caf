"""The ``dynlab`` command: LightningCLI for fit/validate/test, plus thin extra subcommands (``dynlab --help``).

    dynlab fit --config configs/dpo.yaml [--config configs/tiny.yaml] [--model.init_args.beta=0.2 ...]
    dynlab fit --config configs/dpo.yaml --print_config
    dynlab plot RUN_DIR [RUN_DIR ...] --out DIR
    dynlab probe build --source synthetic --split test --size 100 --out probe_test.jsonl
    dynlab probe diagnose --config configs/dpo.yaml --out pairs.parquet   (training pairs ranked by CHES)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace
from jsonargparse._common import debug_mode_active
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dynlab.data.datamodule import ProbeDataModule
from dynlab.errors import InputError, redact
from dynlab.models.load import read_checkpoint
from dynlab.modules.base import CausalLMModule
from dynlab.threads import configure_threads
from dynlab.tracking.loggers import CSVLogger, check_run_dir
from dynlab.tracking.progress import StepProgressBar


class SaveAndLogConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run directory and log it whole to W&B (rank 0)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the first point where the process group exists: ranks > 0 take rank 0's run directory (its version and
        # default_root_dir, where Lightning saves and looks up its Slurm checkpoints), never one of their own guess
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.adopt_version(trainer.strategy.broadcast(logger.version))
        self._log_dir = trainer.log_dir  # a collective under DDP: every rank asks, save_config runs on rank 0 only
        if self._log_dir and any(isinstance(x, CSVLogger) for x in trainer.loggers):
            trainer._default_root_dir = self._log_dir
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # credentials in a value (an endpoint URL's user:KEY@) go neither into config.yaml nor to W&B
        config_file = Path(self._log_dir or ".", self.config_filename)
        if config_file.is_file():
            text = config_file.read_text()
            if redact(text) != text:
                tmp = config_file.with_suffix(".tmp")
                tmp.write_text(redact(text))
                tmp.replace(config_file)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(redact_values(self.config.as_dict()))


def start_wandb_redacted(trainer: Trainer) -> None:
    """Start the W&B runs now (rank 0) with credentials redacted from the command line W&B records in the run's
    metadata; the real ``sys.argv`` comes back at once (Lightning's DDP launcher reuses it). Rank 0 is read from the
    environment, as ``claim()`` does: before the processes launch ``trainer.is_global_zero`` is True on every rank."""
    if rank_zero_only.rank != 0:
        return
    argv = sys.argv
    sys.argv = [redact(a) for a in argv]
    try:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment  # noqa: B018 - the property creates the run
    finally:
        sys.argv = argv


def redact_values(value: Any) -> Any:
    """``value`` (nested dicts and lists) with :func:`dynlab.errors.redact` applied to every string in it."""
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return redact(value) if isinstance(value, str) else value


class DynlabParser(LightningArgumentParser):
    """LightningCLI's parser, with each configuration error as one line, ``dynlab: error: <reason>`` (exit code 2),
    instead of 60-odd lines of usage with the reason buried at their end; ``--help`` still prints the usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode_active():  # jsonargparse parsing a nested value: it raises
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        word = parser.prog.split()[-1] if parser.prog else ""
        command = f"dynlab {word}" if word in LightningCLI.subcommands() else "dynlab"
        print(f"dynlab: error: {config_error_reason(message, command)}", file=sys.stderr)
        sys.exit(2)


_PARSER_KEY = re.compile(r'Parser key "([^"]+)":?\s*')
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
          "Expected a <class 'NoneType'>", "Expected a path but", "Expected a dot import path string")


def config_error_reason(message: str, command: str = "dynlab") -> str:
    r"""jsonargparse's error message (often a dozen nested lines, one per Union alternative that failed) as one line:
    the key, what it expects (a Literal's choices spelled out) and the value given.

    >>> config_error_reason('Parser key "trainer.max_steps":\n  Expected a <class \'int\'>. Got value: abc')
    "trainer.max_steps: expected int, got 'abc'"
    """
    key = ".".join(_PARSER_KEY.findall(message))
    expected, other, given, owner, unknown = [], [], None, None, None
    for line in message.splitlines():
        line = _PARSER_KEY.sub("", line.strip().removeprefix("- ").strip())
        line = re.sub(r"^Type .*? expects a function or a callable class: ", "", line)  # optimizer/scheduler args
        if not line or line.startswith(_NOISE):
            continue
        if match := re.match(r"Problem with given class_path '([^']+)':$", line):
            owner = match[1]
        elif match := re.match(r"Given value: (.*?)(\. Got value: .*)?$", line):
            value = re.fullmatch(r"NestedArg\(key='[^']*', val=(.*)\)", match[1])
            given = given or (value[1].strip("'\"") if value else match[1])  # the innermost comes first
        elif match := re.match(r"Option '([^']+)' is not accepted|Subcommand '\w+' does not accept option '([^']+)'",
                               line):
            unknown = match[1] or match[2]
            if inner := re.search(r"Got value: Namespace\(class_path='([^']+)'", line):  # an optimizer's, say
                owner = inner[1]
        elif line.startswith("unrecognized arguments:"):
            return f"{line} ({command} --help lists the options)"
        elif match := re.match(r"Expected an? (.*?)(?:\. Got value: (.*))?$", line):
            kind = re.sub(r"^<class '(?:builtins\.)?(.*)'>$", r"\1", match[1])
            choices = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
            expected.append(f"one of {choices[1]}" if choices else kind)
            given = given or match[2]
        else:
            other.append(line)
    where = f"{key}: " if key else ""
    if unknown:
        return (f"{key + '.' if key else ''}{unknown}: no such option{f' of {owner}' if owner else ''} "
                f"({command} --help lists the options)")
    if expected:
        return f"{where}expected {' or '.join(dict.fromkeys(expected))}{f', got {given!r}' if given else ''}"
    if other:
        return f"{where}{'; '.join(dict.fromkeys(other))}"
    return " ".join(message.split())


def check_config_files(args: Sequence[str]) -> None:
    """Each ``--config`` file of ``args`` exists and holds a YAML mapping, else an InputError naming the file
    (jsonargparse names none for an empty file or bad YAML)."""
    paths = [b for a, b in zip(args, args[1:]) if a in ("-c", "--config")]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        if not Path(path).is_file():
            if "\n" not in path and not path.lstrip().startswith("{"):  # else inline YAML, which jsonargparse reads
                raise InputError("no such config file", file=path)
            continue
        try:
            config = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise InputError(f"not valid YAML: {getattr(err, 'problem', None) or err}{where}",
                             file=path) from err
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read it ({err})", file=path) from err
        if config is None:
            raise InputError("the config file is empty", file=path)
        if not isinstance(config, dict):
            raise InputError(f"a config file holds a mapping (trainer:, model:, data: ...), not a "
                             f"{type(config).__name__}", file=path)


class DynlabCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with OmegaConf interpolation in configs."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True):
        super().__init__(
            CausalLMModule,
            ProbeDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            parser_class=DynlabParser,
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None or isinstance(args, (list, tuple)):
            check_config_files(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)
        # LightningCLI reads the --ckpt_path file's hyperparameters next: a missing or corrupt one fails here, in one
        # line (Lightning's own names aside; "last" is resolved in _prepare_subcommand_kwargs)
        subcommand = self.config.get("subcommand")
        ckpt = str(self.config[subcommand].get("ckpt_path") or "") if subcommand else ""
        if ckpt and ckpt not in ("last", "best", "hpc") and "://" not in ckpt and not ckpt.startswith("registry"):
            read_checkpoint(ckpt, "ckpt_path", mmap=True)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no predict: the modules have no predict_step (`dynlab generate` samples responses)
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            fill_run_root(self.config[self.subcommand])

    def after_instantiate_classes(self) -> None:
        # Lightning's default rich bar shows "Epoch 0/-2" in a run bounded by max_steps; this one counts its steps
        callbacks = self.trainer.callbacks
        for i, callback in enumerate(callbacks):
            if type(callback) is RichProgressBar:
                callbacks[i] = StepProgressBar(refresh_rate=callback.refresh_rate, leave=callback._leave,
                                               theme=callback.theme, console_kwargs=callback._console_kwargs)
        # Lightning passes W&B anonymous=None always, and W&B warns on every run that the setting has no effect
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous", False) is None:
                del logger._wandb_init["anonymous"]

    def _prepare_data(self) -> None:
        # read, validate and tokenize all data now, so bad input fails before the run directory is written
        hp, trainer, config = self.datamodule.hparams, self.trainer, self.config[self.subcommand]
        self.model.check_strategy(trainer)  # e.g. probes under FSDP
        if self.subcommand == "fit":
            # built once now, so that lr < 0 and other values torch refuses fail before the run starts: the optimizer
            # alone first, then with its scheduler, so that the error names the argument that refused
            model, field = self.model, "model.optimizer"
            try:
                if model.optimizer_factory is not None:
                    model.optimizer_factory([p for p in model.policy.parameters() if p.requires_grad])
                field = "model.scheduler"
                model.configure_optimizers()  # the optimizer builds: only the scheduler can refuse here
            except (ValueError, TypeError) as err:
                raise InputError(f"{err} (building the {field.removeprefix('model.')})", field=field) from err
        if hp.rephraser and trainer.world_size > 1:  # each rank would draw its own, different rephrases
            raise InputError("build rephrased probes once (dynlab probe build --rephraser ... --out FILE) and pass "
                             "the file as data.probe_train_file / data.probe_test_file for multi-process runs",
                             field="data.rephraser")
        if self.subcommand == "fit" and config.get("ckpt_path"):
            # a resumed run scores exactly the probe texts it started with (sampled or rephrased ones included)
            for split in ("train", "test"):
                saved = Path(trainer.log_dir or ".", "probes", f"probe_{split}.jsonl")
                if saved.is_file():
                    hp[f"probe_{split}_file"] = str(saved)
        self.datamodule.prepare(self.model.tokenizer, self.model.training_view, self.model.generate,
                                self.model.score_pairs)

    before_fit = before_validate = before_test = _prepare_data

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if self.trainer.loggers:
            # the run directory, claimed now (by rank 0: created, locked), after the input was checked; Lightning's
            # Slurm pre-emption checkpoints (hpc_ckpt_*.ckpt in default_root_dir) go in it too, so a requeued job
            # finds its own
            # find its own. Ranks > 0 of an automatic version learn it from rank 0 only once the process group
            # exists (SaveAndLogConfig.setup); until then theirs is a placeholder (.../version_None) that holds
            # nothing, like rank 0's new directory. A fixed version is the same on every rank already
            for logger in self.trainer.loggers:
                if isinstance(logger, CSVLogger):
                    logger.claim(resuming=bool(kwargs.get("ckpt_path")))
            self.trainer._default_root_dir = self.trainer.log_dir
            start_wandb_redacted(self.trainer)
        if kwargs.get("ckpt_path") == "last":
            # None on a fixed-version run's first start (a Slurm job's, say): nothing to resume yet, and Lightning
            # would warn that there is no last checkpoint
            kwargs["ckpt_path"] = newest_checkpoint(self.trainer) or (None if subcommand == "fit" else "last")
        if subcommand == "fit" and self.trainer.loggers and rank_zero_only.rank == 0:  # where to look, from the start
            print(f"dynlab: run directory: {self.trainer.log_dir}  "
                  f"({'resuming' if kwargs.get('ckpt_path') else 'starting'})", flush=True)
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
    """``dynlab probe build``: write a probe set in the paper's probe jsonl format from any preference source.
    ``dynlab probe diagnose``: rank a run's training pairs by their likelihood-displacement scores."""
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
    diagnose = sub.add_parser("diagnose", help="score every training pair (CHES, edit distance) under the initial "
                                               "model and write a table ranked by normalised CHES")
    diagnose.add_argument("--config", action="append", required=True,
                          help="the run's config file(s), as given to dynlab fit (repeat to stack)")
    diagnose.add_argument("--out", required=True, help="output table, .jsonl or .parquet")
    diagnose.add_argument("--batch-size", type=int, default=8, help="pairs per forward")
    args = parser.parse_args(argv)
    if args.action == "diagnose":
        return diagnose_pairs(args.config, args.out, args.batch_size)
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


def diagnose_pairs(configs: Sequence[str], out: str, batch_size: int = 8) -> Path:
    """``dynlab probe diagnose``: every training pair of the run ``configs`` describe, scored under its initial
    model (CHES, normalised CHES, edit distance; see ``dynlab.metrics.displacement``) and written ranked by normalised
    CHES, highest (most displacing) first: the pairs ``data.drop_most_displacing`` would drop come first. The model
    and data module are built as ``dynlab fit`` builds them (``init_from`` included); nothing is trained or written
    besides ``out``. Training rows without a rejected response are left out."""
    from dynlab.modules.base import PairScoringProgress
    from dynlab.tracking.trajectory import write_table

    if batch_size < 1:
        raise InputError(f"must be at least 1, got {batch_size}", field="--batch-size")
    if Path(out).suffix not in (".jsonl", ".parquet"):
        raise InputError(f"the table is written as .jsonl or .parquet, got {out!r}", field="--out")
    args = [x for config in configs for x in ("--config", config)]
    check_config_files(args)
    quiet_noise()
    cli = DynlabCLI(args=args, run=False)
    pairs = cli.datamodule.training_pairs(cli.model.tokenizer)
    if not pairs:
        raise InputError("no training row has a rejected response: there is no pair to score", field="data.source")
    scores = cli.model.score_pairs(pairs, batch_size, progress=PairScoringProgress("probe diagnose", after_s=0.0))
    table = sorted(({"rank": 0, "index": s["index"], "prompt": p["prompt"], **s} for p, s in zip(pairs, scores)),
                   key=lambda r: (-r["ches_norm"], r["index"]))
    for rank, row in enumerate(table):
        row["rank"] = rank
    path = write_table(out, table)
    print(f"{path}: {len(table)} training pairs ranked by normalised CHES, most displacing first")
    return path


def sweep_command(argv: Sequence[str]) -> None:
    """``dynlab sweep``: run a W&B sweep YAML locally (no W&B server) with W&B's open-source sweep engine."""
    parser = argparse.ArgumentParser(prog="dynlab sweep", description=sweep_command.__doc__)
    parser.add_argument("sweep", help="a sweep YAML, e.g. sweeps/dpo_lr_epochs.yaml")
    parser.add_argument("--count", type=int, required=True, help="total trials (finished ones from before count)")
    parser.add_argument("--config", action="append", default=[], help="overlay config(s) for every trial")
    parser.add_argument("--trainer.default_root_dir", dest="root", default=None,
                        help="where the trials' runs and the summary go (default runs)")
    parser.add_argument("--out", default=None, help="summary directory (default <root>/sweeps/<sweep name>)")
    args = parser.parse_args(argv)
    from dynlab.sweep import run_sweep

    run_sweep(args.sweep, args.count, overlays=args.config, out_dir=args.out, root=args.root)


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
               "judge": _lazy("dynlab.evaluation.cli", "judge_command"),
               "reward-model": _lazy("dynlab.evaluation.reward_model", "main"),
               "report": _lazy("dynlab.evaluation.html_report", "main"),
               "reproduce": _lazy("dynlab.reproduce", "main")}


def fill_run_root(config: Namespace) -> None:
    """One setting decides where a run lives: ``trainer.default_root_dir`` (default ``runs``) becomes the save_dir of
    every logger that names none, so the run directory is ``<root>/<stage>/version_N`` (the CSV logger's), W&B's
    runs go to ``<root>/<stage>/wandb`` and the checkpoints (ModelCheckpoint uses the first logger's directory) to
    the run directory. A logger that names its own save_dir keeps it (with a one-line warning when
    ``default_root_dir`` was given too). The run directory is checked here, before anything is built: a fixed one
    that another live run holds, or that holds a finished run while no ``--ckpt_path`` is given, is refused, and so
    is ``--ckpt_path=last`` without a fixed one (a new ``version_N`` has nothing to resume)."""
    trainer = config.trainer
    given = trainer.default_root_dir
    trainer.default_root_dir = root = given or "runs"
    ckpt_path = config.get("ckpt_path")
    loggers = [x for x in (trainer.logger if isinstance(trainer.logger, list) else [trainer.logger])
               if isinstance(x, Namespace) and isinstance(x.get("init_args"), Namespace)]
    stage = next((x.init_args.get("name") or "" for x in loggers if x.class_path.endswith("CSVLogger")), "")
    for logger in loggers:
        own = logger.init_args.get("save_dir")
        if logger.class_path.endswith("WandbLogger") and own in (None, "."):
            logger.init_args.save_dir = os.path.join(root, stage)
        elif "save_dir" in logger.init_args and own is None:
            logger.init_args.save_dir = root
        elif given and own not in (None, ".") and not _inside(str(own), str(given)) and rank_zero_only.rank == 0:
            print(f"dynlab: warning: {logger.class_path.rsplit('.', 1)[-1]} save_dir {own!r} overrides "
                  f"--trainer.default_root_dir={given} for that logger's files", file=sys.stderr)
        if logger.class_path == "dynlab.tracking.loggers.CSVLogger":  # here, since jsonargparse buries its errors
            version = logger.init_args.get("version")
            if ckpt_path == "last" and version is None:
                raise InputError("--ckpt_path=last needs DYNLAB_RUN_VERSION (or a fixed logger version) to know "
                                 "which run to resume", field="ckpt_path")
            check_run_dir(logger.init_args.save_dir, logger.init_args.get("name"), version,
                          resuming=bool(ckpt_path))


def _inside(path: str, root: str) -> bool:
    path, root = os.path.abspath(path), os.path.abspath(root)
    return os.path.commonpath([path, root]) == root


def newest_checkpoint(trainer: Trainer) -> str | None:
    """For ``--ckpt_path=last``: the newest of the run's checkpoints and Lightning's Slurm pre-emption checkpoints
    (``hpc_ckpt_*.ckpt``, saved on SIGUSR1 in ``default_root_dir``: the run directory), so a requeued job loses no
    steps."""
    candidates = {*Path(trainer.log_dir or ".", "checkpoints").glob("*.ckpt"),
                  *Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")}
    # ties broken by name, so that every rank (each reads the same fixed run directory) picks the same file
    return str(max(candidates, key=lambda p: (p.stat().st_mtime, p.name))) if candidates else None


OVERVIEW = {
    "fit": "train a module (SFT, ExtendSFT, DPO, ...) with probe evaluation: --config configs/dpo.yaml",
    "validate": "one probe evaluation of a model or checkpoint (--ckpt_path)",
    "test": "the same evaluation through Lightning's test loop",
    "plot": "paper-style PNG figures from one or more runs' probe trajectories",
    "report": "one self-contained HTML page: signatures, figures, curves, configs, probe examples",
    "reproduce": "the paper's picture on real data: SFT and ExtendSFT, DPO from each, signatures, report",
    "probe": "build a probe set (probe build ...) or rank training pairs by CHES (probe diagnose ...)",
    "sweep": "run a W&B sweep YAML locally, one dynlab fit per trial, with a summary table",
    "slurm": "write (and --submit) an sbatch script running dynlab fit or sweep on N nodes",
    "toy": "the squeezing effect on a linear softmax model, and Prop. 1 on 8x8 digits",
    "generate": "greedy and sampled responses of a model to a prompt set, with a repetition table",
    "judge": "pairwise preference between two sets of responses (win rate with a bootstrap CI)",
    "reward-model": "fit a reward model's head (Bradley-Terry, frozen backbone) for --judge rm:DIR",
}


def print_overview(file=sys.stdout) -> None:
    """``dynlab --help``: every subcommand, one line each (``dynlab SUBCOMMAND --help`` gives its options)."""
    print("usage: dynlab SUBCOMMAND [options]   (dynlab SUBCOMMAND --help for its options)\n\nsubcommands:", file=file)
    for name, line in OVERVIEW.items():
        print(f"  {name:<14}{line}", file=file)


class _DropLogRecords(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes`` (exact messages, nothing else)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_noise() -> None:
    """Silence the messages a dynlab user cannot act on, each matched exactly."""
    # called with explicit args from Python (tests, sweeps), sys.argv belongs to the caller
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # Lightning's hint for machines that have srun installed but run dynlab outside Slurm: noise here
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
    # during fit the probe loaders are run by the module itself, so Lightning's validation loader list is empty
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    # Lightning's own pytree helper uses torch's deprecated LeafSpec (lightning 2.6 with torch >= 2.9)
    warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
                            category=FutureWarning)
    # an advertisement, printed on every run
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLogRecords) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLogRecords("💡 Tip: For seamless cloud logging"))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``dynlab`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in ([], ["-h"], ["--help"]):
        print_overview(sys.stdout if args else sys.stderr)
        if not args:
            sys.exit(2)
        return
    configure_threads()  # DYNLAB_THREADS, else the CPUs this process may use, unless the user set OMP_NUM_THREADS
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
    quiet_noise()
    try:
        DynlabCLI(args=None if argv is None else list(argv))
    except SIGTERMException:
        # stops (see CausalLMModule.stop_if_asked): Lightning's SIGTERMException would exit 0, as if the run were done
        print("dynlab: stopped by SIGTERM; resume with --ckpt_path=last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # before or after fit (inside it Lightning shuts down and exits 1 itself)
        print("dynlab: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
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
