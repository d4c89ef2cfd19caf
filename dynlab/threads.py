"""How many CPU threads torch uses in a ``dynlab`` process.

torch picks its thread count from the machine's cores, which can be more than the share this process may use (a
Slurm allocation, a container's CPU set, a taskset). ``dynlab`` sets the count once, at start-up:

- ``DYNLAB_THREADS=N`` is used as is (and exported as ``OMP_NUM_THREADS``, so Lightning's DDP launcher keeps it);
- ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set, or torch's count already changed in this process
  (``torch.set_num_threads`` before ``dynlab.cli.main``): left alone, the user chose;
- otherwise the CPUs this process may use (``SLURM_CPUS_PER_TASK`` when set, else ``os.sched_getaffinity``), but no
  more than torch's own default (its count before dynlab changes it: the physical cores, where those CPUs count
  SMT siblings too), divided by the local ranks of a DDP job started by torchrun (``LOCAL_WORLD_SIZE``), at
  least 1. A CPU DDP job that Lightning launches itself is divided by Lightning (the same CPUs over its processes),
  since the count is not exported in that case.

On a busy machine fewer threads can be much faster (1 thread ran 5x faster than 2 on a loaded 2-core machine):
set ``DYNLAB_THREADS=1`` there.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import NamedTuple

from dynlab.errors import InputError

log = logging.getLogger(__name__)


class ThreadChoice(NamedTuple):
    threads: int | None  # None: leave torch's count as it is
    reason: str
    export: bool = False  # also set OMP_NUM_THREADS, for the processes Lightning launches and its DDP launcher


def _positive(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise InputError(f"expected a whole number of threads, at least 1, got {value!r}", field=name)
    return number


def decide_threads(env: Mapping[str, str], affinity: int, torch_threads_set: bool = False,
                   torch_default: int | None = None) -> ThreadChoice:
    """The thread count for a process with environment ``env`` that may run on ``affinity`` CPUs (pure);
    ``torch_default`` is torch's own count before dynlab sets one (physical cores: fewer than the logical CPUs of an
    SMT machine), a cap on the CPUs counted, or ``None`` for no cap.

    Raises:
        InputError: for a ``DYNLAB_THREADS``, ``SLURM_CPUS_PER_TASK`` or ``LOCAL_WORLD_SIZE`` that is not a whole
            number >= 1.
    """
    if (forced := _positive(env, "DYNLAB_THREADS")) is not None:
        return ThreadChoice(forced, "DYNLAB_THREADS", export=True)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if env.get(name, "").strip():
            return ThreadChoice(None, f"{name}={env[name]} set by the user")
    if torch_threads_set:
        return ThreadChoice(None, "torch.set_num_threads called before dynlab")
    slurm, local = _positive(env, "SLURM_CPUS_PER_TASK"), _positive(env, "LOCAL_WORLD_SIZE")
    cpus, where = (slurm, "SLURM_CPUS_PER_TASK") if slurm is not None else (max(affinity, 1), "CPUs in this "
                                                                              "process's affinity")
    reason = f"{cpus} {where}"
    if torch_default is not None and 0 < torch_default < cpus:  # SMT: one thread per physical core, not per sibling
        cpus, reason = torch_default, f"torch's default {torch_default} (physical cores), under the {reason}"
    threads = max(1, cpus // (local or 1))
    reason += f" / {local} local ranks (LOCAL_WORLD_SIZE)" if local else ""
    # exported only where the count is this process's alone; a plain process may become the parent of Lightning's
    # CPU DDP launcher, whose children would inherit it, and Lightning divides the CPUs over them itself
    return ThreadChoice(threads, reason, export=slurm is not None or local is not None)


_configured = False


def configure_threads() -> None:
    """Set torch's thread count once per process as :func:`decide_threads` says, and log the choice (info). For
    ``dynlab.cli.main``: a bad value ends the process with one line, ``dynlab: error: ...``, and exit code 2."""
    global _configured
    if _configured:
        return
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # with neither variable set torch starts both pools at the same default size; a differing intra-op count was
    # set by hand (an approximation: torch has no "was it set" flag). Read once, before dynlab sets it: torch's default
    default = torch.get_num_threads()
    try:
        choice = decide_threads(os.environ, affinity, default != torch.get_num_interop_threads(), default)
    except InputError as err:
        print(f"dynlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    _configured = True
    if choice.threads is None:
        log.info("torch threads: %d, left as they are (%s)", torch.get_num_threads(), choice.reason)
        return
    torch.set_num_threads(choice.threads)
    if choice.export:
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    log.info("torch threads: %d (%s)", choice.threads, choice.reason)
