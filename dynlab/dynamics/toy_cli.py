"""``dynlab toy``: the paper's two toy demonstrations as PNG figures and a JSON summary.

    dynlab toy squeeze --out figures/squeeze [--seed 10086]
    dynlab toy digits --out figures/digits [--seed 0] [--example 0] [--epochs 10] [--lrs 1e-4 1e-3 1e-2 1e-1]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dynlab.dynamics.squeeze import SEED


def toy_command(argv: Sequence[str]) -> None:
    """``dynlab toy``: the squeezing effect on a linear softmax model, and Prop. 1 checked on 8×8 digits."""
    parser = argparse.ArgumentParser(prog="dynlab toy", description=toy_command.__doc__)
    sub = parser.add_subparsers(dest="toy", required=True)
    squeeze = sub.add_parser("squeeze", help="before/after π of one positive or negative step (paper App. C)")
    squeeze.add_argument("--out", required=True, help="directory for the PNG files and squeeze_summary.json")
    squeeze.add_argument("--seed", type=int, default=SEED, help=f"the notebook's seed is {SEED}")
    digits = sub.add_parser("digits", help="measured Δlog π after one SGD step against −ηAKG (scikit-learn digits)")
    digits.add_argument("--out", required=True, help="directory for the PNG files and digits_summary.json")
    digits.add_argument("--seed", type=int, default=0, help="data split, initialisation and batch order")
    digits.add_argument("--example", type=int, default=0, help="index of the updated training example u")
    digits.add_argument("--epochs", type=int, default=10, help="SGD epochs before the one-step check")
    digits.add_argument("--hidden", type=int, default=64, help="width of the MLP's tanh layer")
    digits.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates η of the one-step check (default: 7 from 1e-4 to 1e-1)")
    digits.add_argument("--per-class", type=int, default=5, help="training examples per row of the heatmap")
    args = parser.parse_args(argv)

    if args.toy == "squeeze":
        from dynlab.dynamics.squeeze import run_squeeze

        written = run_squeeze(args.out, seed=args.seed)
    else:
        from dynlab.dynamics.digits import DEFAULT_LRS, run_digits

        written = run_digits(args.out, seed=args.seed, example=args.example, epochs=args.epochs,
                             hidden=args.hidden, lrs=tuple(args.lrs) if args.lrs else DEFAULT_LRS,
                             per_class=args.per_class)
    for path in written:
        print(path)
