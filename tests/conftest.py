"""Shared fixtures: the tiny model spec, runs inside a temporary directory, and the dynlab CLI in-process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynlab.models.load import ModelSpec

# W&B is part of the shipped configs; tests that do not read it back keep it out of the way (fast, no files)
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_PROBE_FILE = REPO.parent / "shared" / "data" / "hh_probe" / "probe_test.jsonl"


# The longest files first: under `make test` (pytest -n auto --dist loadfile) a file that started last would run alone
# at the end while the other workers idle.
LONGEST_FIRST = ("test_signatures.py", "test_lora_smollm2.py", "test_displacement_smollm2.py", "test_slow_smollm2.py",
                 "test_slurm.py", "test_ddp.py", "test_fsdp.py",
                 "test_compare_extend.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay together, in order


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """``module_tmp(name)``: a fresh directory for a module's shared runs, removed once the module's tests are done
    unless one of them failed (like ``tmp_path_retention_policy = "failed"`` does for tmp_path). The SmolLM2 runs
    write gigabytes (weights, optimizer state, exports); kept to the session's end, they filled a CI machine's disk."""
    failed_before, made = request.session.testsfailed, []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(name_or_path="tiny")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh directory so ``runs/`` and everything else a run writes lands in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_dynlab(*args: str, cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``dynlab ARGS`` as a subprocess (the only safe way to run DDP from pytest), output captured."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dynlab.cli", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def run_dir_of(proc: subprocess.CompletedProcess, cwd: Path) -> Path:
    """The run directory a `dynlab fit` subprocess printed at its end."""
    line = next(x for x in proc.stdout.splitlines() if x.startswith("dynlab: run directory: "))
    return cwd / line.removeprefix("dynlab: run directory: ").split()[0]
