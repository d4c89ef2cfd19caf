"""dynlab.threads: the thread count a dynlab process gives torch, from its environment and the CPUs it may use."""

from __future__ import annotations

import os

import pytest
import torch

from dynlab import threads
from dynlab.cli import main  # imported here: Lightning's import sets variables of its own, before any snapshot
from dynlab.errors import InputError
from dynlab.threads import decide_threads

SET_BY_USERS = ("DYNLAB_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def environment_unchanged():
    """No test here leaves os.environ changed (configure_threads writes OMP_NUM_THREADS into it directly)."""
    def snapshot() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own, per phase

    before = snapshot()
    yield
    assert snapshot() == before


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean slate: none of the variables the decision reads (the tests set the ones they need). Each is set
    before it is deleted, so monkeypatch restores it (deleting an unset one records nothing, and a value that
    configure_threads writes later would outlive the test)."""
    for name in SET_BY_USERS:
        monkeypatch.setenv(name, "1")
        monkeypatch.delenv(name)
    return monkeypatch


def test_the_cpus_this_process_may_use(env) -> None:
    assert decide_threads(os.environ, affinity=6) == (6, "6 CPUs in this process's affinity", False)
    assert decide_threads(os.environ, affinity=0).threads == 1


def test_slurm_cpus_per_task_and_the_local_ranks_of_a_ddp_job(env) -> None:
    env.setenv("SLURM_CPUS_PER_TASK", "8")
    assert decide_threads(os.environ, affinity=64) == (8, "8 SLURM_CPUS_PER_TASK", True)
    env.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's: 3 processes share this node's CPUs
    assert decide_threads(os.environ, affinity=64).threads == 2
    env.delenv("SLURM_CPUS_PER_TASK")
    choice = decide_threads(os.environ, affinity=2)
    assert choice.threads == 1 and choice.export and "3 local ranks" in choice.reason  # at least 1


def test_no_more_threads_than_torchs_default_physical_cores(env) -> None:
    # an SMT machine: 16 logical CPUs in the affinity, torch's default is its 8 physical cores
    assert decide_threads(os.environ, affinity=16, torch_default=8) == (
        8, "torch's default 8 (physical cores), under the 16 CPUs in this process's affinity", False)
    assert decide_threads(os.environ, affinity=4, torch_default=8).threads == 4  # a smaller CPU set still wins
    env.setenv("SLURM_CPUS_PER_TASK", "12")
    env.setenv("LOCAL_WORLD_SIZE", "2")
    choice = decide_threads(os.environ, affinity=64, torch_default=8)
    assert choice.threads == 4 and choice.reason.endswith("12 SLURM_CPUS_PER_TASK / 2 local ranks (LOCAL_WORLD_SIZE)")
    env.setenv("LOCAL_WORLD_SIZE", "16")
    assert decide_threads(os.environ, affinity=64, torch_default=8).threads == 1  # at least 1


def test_the_users_choice_is_left_alone_and_dynlab_threads_overrides_everything(env) -> None:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setenv(name, "3")
        assert decide_threads(os.environ, affinity=16) == (None, f"{name}=3 set by the user", False)
        env.delenv(name)
    assert decide_threads(os.environ, affinity=16, torch_threads_set=True).threads is None
    env.setenv("OMP_NUM_THREADS", "4")
    env.setenv("SLURM_CPUS_PER_TASK", "8")
    env.setenv("DYNLAB_THREADS", "1")
    assert decide_threads(os.environ, affinity=16, torch_threads_set=True) == (1, "DYNLAB_THREADS", True)


@pytest.mark.parametrize("name", ["DYNLAB_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"])
@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_count_names_its_variable(env, name: str, value: str) -> None:
    env.setenv(name, value)
    with pytest.raises(InputError, match="at least 1") as info:
        decide_threads(os.environ, affinity=4)
    assert info.value.field == name and repr(value) in str(info.value)


def test_configure_threads_sets_torch_once_and_exports_only_a_count_of_its_own(env, caplog) -> None:
    calls: list[int] = []
    env.setattr(torch, "set_num_threads", calls.append)
    env.setattr(torch, "get_num_threads", lambda: 4)
    env.setattr(torch, "get_num_interop_threads", lambda: 4)  # equal: nobody changed torch's count
    env.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    env.setattr(threads, "_configured", False)
    with caplog.at_level("INFO", logger="dynlab.threads"):
        threads.configure_threads()
        threads.configure_threads()  # once per process
    assert calls == [3] and "OMP_NUM_THREADS" not in os.environ  # a Lightning DDP launcher divides these itself
    assert [r.getMessage() for r in caplog.records] == ["torch threads: 3 (3 CPUs in this process's affinity)"]
    env.setattr(threads, "_configured", False)
    env.setenv("DYNLAB_THREADS", "2")
    threads.configure_threads()
    assert calls == [3, 2] and os.environ["OMP_NUM_THREADS"] == "2"  # kept by Lightning and its child processes


def test_configure_threads_caps_the_affinity_at_torchs_default(env) -> None:
    calls: list[int] = []
    env.setattr(torch, "set_num_threads", calls.append)
    env.setattr(torch, "get_num_threads", lambda: 2)  # torch's default at start-up: 2 physical cores
    env.setattr(torch, "get_num_interop_threads", lambda: 2)
    env.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))  # their 4 SMT siblings
    env.setattr(threads, "_configured", False)
    threads.configure_threads()
    assert calls == [2]


def test_a_bad_dynlab_threads_is_one_line_and_exit_code_2(env, capsys) -> None:
    env.setattr(threads, "_configured", False)
    env.setenv("DYNLAB_THREADS", "lots")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "configs/tiny.yaml"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "dynlab: error: field 'DYNLAB_THREADS': expected a whole number of threads, at least 1, got 'lots'"]
