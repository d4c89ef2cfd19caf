"""Every benchmark, each in a fresh process, then the markdown table: what ``make bench`` runs.

    python -m benchmarks.run_all [--quick] [--only train_throughput,probe_vs_paper] [--device cuda --dtype bf16]

Results go to ``benchmarks/results/*.json`` and ``benchmarks/results/RESULTS.md`` (``--out`` elsewhere). The whole
set took about 40 minutes on the shared 2-core CPU it was written on (load average 2-5 from other jobs); ``--quick``
about 4 (the ~20M model, few steps: for development); ``lora`` (a fresh process per system and round) adds about 12
(``--quick`` 4-5); ``sampling`` (generation vs plain ``model.generate``, the on-policy step split, SimPO memory)
about 6. ``benchmarks/before_after.py`` (the fixes' A/B, about 12 minutes) is not part of the set:
``--only before_after`` runs it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks import report
from benchmarks.common import RESULTS

BENCHMARKS = ("train_throughput", "probe_vs_paper", "probe_overhead", "scaling", "lora", "sampling")
OPTIONAL = ("before_after",)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument("--out", default=str(RESULTS))
    args, passthrough = parser.parse_known_args(argv)
    failed = []
    for name in args.only.split(","):
        if name not in BENCHMARKS + OPTIONAL:
            parser.error(f"unknown benchmark {name!r}; expected some of {', '.join(BENCHMARKS + OPTIONAL)}")
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--out", args.out, *passthrough])
        print(f"== {name}: exit {proc.returncode} after {time.perf_counter() - start:.0f}s", flush=True)
        if proc.returncode:
            failed.append(name)
    report.main(["--results", args.out])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
