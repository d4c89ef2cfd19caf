"""The ``dynlab`` command: LightningCLI for fit/validate/test, plus thin extra subcommands.

    dynlab fit --config configs/dpo.yaml [--config configs/tiny.yaml] [--model.beta=0.2 ...]
    dynlab fit --config configs/dpo.yaml --print_config
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from dynlab.data.datamodule import ProbeDataModule
from dynlab.errors import InputError
from dynlab.modules.base import CausalLMModule


class DynlabCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with OmegaConf interpolation in configs."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True):
        super().__init__(
            CausalLMModule,
            ProbeDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def _prepare_data(self) -> None:
        # read, validate and tokenize all data now, so bad input fails before the run directory is written
        self.datamodule.prepare(self.model.tokenizer, self.model.training_view)

    before_fit = before_validate = before_test = _prepare_data

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(f"dynlab: run directory: {self.model.run_dir}  (metrics.csv, config.yaml, checkpoints/, export/)")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``dynlab`` console script."""
    # called with explicit args from Python (tests, sweeps), sys.argv belongs to the caller
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
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
