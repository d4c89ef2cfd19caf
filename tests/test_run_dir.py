"""Where a run lives: ``--trainer.default_root_dir`` decides it for every file a run writes; a run directory is
allocated atomically and locked while its run is live, so two runs never share one; a fixed run directory name
(``DYNLAB_RUN_VERSION``) must be one name inside the stage directory."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dynlab.cli import main
from dynlab.errors import InputError
from dynlab.tracking import loggers
from dynlab.tracking.loggers import LOCK_FILE, CSVLogger, acquire_run_lock, check_run_version, release_run_lock
from tests.conftest import CONFIGS, REPO, run_dynlab

TINY_SFT = ["fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "tiny.yaml")]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir: Path, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


@contextlib.contextmanager
def held_by_another_process(run_dir: Path, slurm_job_id: str | None = None):
    """A live process holding ``run_dir``'s lock (with acquire_run_lock) until the block ends; yields its pid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = ("import sys; from dynlab.tracking.loggers import acquire_run_lock; acquire_run_lock(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env.update(PYTHONPATH=str(REPO), **({"SLURM_JOB_ID": slurm_job_id} if slurm_job_id else {}))
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without locking: flock fails with ENOLCK, and the lock file's contents decide."""
    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(loggers.fcntl, "flock", flock)


def test_default_root_dir_holds_every_file_of_the_run(tmp_path):
    # a fresh process: W&B reads WANDB_MODE once per process, and other tests ran it disabled
    proc = run_dynlab(*TINY_SFT, "--trainer.default_root_dir=tmp/elsewhere", cwd=tmp_path, timeout=600,
                      env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # nothing in ./runs
    run = Path("tmp/elsewhere/sft/version_0")
    for name in ("metrics.csv", "config.yaml", "checkpoints/last.ckpt", "probes/probe_test.jsonl", "figures",
                 "export/config.json"):
        assert (tmp_path / run / name).exists(), name
    assert list((tmp_path / "tmp/elsewhere/sft/wandb").glob("offline-run-*"))
    assert not (tmp_path / run / LOCK_FILE).exists()  # released at the end
    assert f"dynlab: run directory: {run}" in proc.stdout


def test_the_root_is_filled_in_only_for_loggers_that_name_none():
    from jsonargparse import Namespace

    from dynlab.cli import fill_run_root

    config = Namespace(trainer=Namespace(default_root_dir=None, logger=[
        Namespace(class_path="dynlab.tracking.loggers.CSVLogger", init_args=Namespace(save_dir=None, name="dpo")),
        Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(save_dir=".")),
        Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="mine"))]))
    fill_run_root(config)
    assert config.trainer.default_root_dir == "runs"
    assert [x.init_args.save_dir for x in config.trainer.logger] == ["runs", os.path.join("runs", "dpo"), "mine"]


def test_an_explicit_save_dir_that_overrides_the_root_is_warned_about(capsys):
    from jsonargparse import Namespace

    from dynlab.cli import fill_run_root

    config = Namespace(trainer=Namespace(default_root_dir="elsewhere", logger=[
        Namespace(class_path="dynlab.tracking.loggers.CSVLogger", init_args=Namespace(save_dir="mine", name="sft")),
        Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(save_dir="."))]))
    fill_run_root(config)
    assert config.trainer.logger[0].init_args.save_dir == "mine"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dynlab: warning: CSVLogger save_dir 'mine' overrides --trainer.default_root_dir=elsewhere for "
                   "that logger's files"]
    config.trainer.logger[0].init_args.save_dir = "elsewhere/"  # the same directory: nothing to say
    fill_run_root(config)
    assert capsys.readouterr().err == ""


def test_other_ranks_never_guess_a_version_and_take_rank_0s(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.utilities import rank_zero_only

    from dynlab.cli import SaveAndLogConfig

    CSVLogger(tmp_path, name="sft").claim()  # rank 0 took version_0 before rank 1 started
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    other = CSVLogger(tmp_path, name="sft")
    assert other.version is None and other.claim() == str(tmp_path / "sft" / "version_None")  # not version_1
    assert not (tmp_path / "sft" / "version_1").exists()

    class Rank1Trainer:  # the process group exists: broadcast gives rank 0's value (its version: 0)
        loggers, is_global_zero, _default_root_dir = [other], False, str(tmp_path)
        strategy = SimpleNamespace(broadcast=lambda obj, src=0: 0 if obj is None else obj)

        @property
        def log_dir(self):
            return self.loggers[0].log_dir

    trainer = Rank1Trainer()
    SaveAndLogConfig(None, None, overwrite=True).setup(trainer, None, "fit")
    assert other.version == 0 and trainer._default_root_dir == str(tmp_path / "sft" / "version_0")


def test_a_fixed_directory_holding_a_run_is_refused_under_the_lock_unless_resuming(tmp_path):
    run = tmp_path / "sft" / "job"
    run.mkdir(parents=True)
    CSVLogger(tmp_path, name="sft", version="job").claim(resuming=False)  # empty: a first start
    release_run_lock(run)
    (run / "metrics.csv").write_text("step\n0\n")  # another run finished in it since this one was checked
    with pytest.raises(InputError, match="already holds a run .*--ckpt_path=last"):
        CSVLogger(tmp_path, name="sft", version="job").claim(resuming=False)
    assert loggers.live_holder(run) is None and not (run / LOCK_FILE).exists()  # released
    assert CSVLogger(tmp_path, name="sft", version="job").claim(resuming=True) == str(run)


def test_ckpt_path_last_without_a_fixed_version_is_refused(in_tmp, monkeypatch, capsys):
    monkeypatch.delenv("DYNLAB_RUN_VERSION", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main([*TINY_SFT, "--ckpt_path=last"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ckpt_path=last needs DYNLAB_RUN_VERSION" in err[0]
    assert list(in_tmp.iterdir()) == []


def test_two_runs_that_looked_up_the_same_free_version_get_their_own_directories(tmp_path):
    # Lightning's CSVLogger keeps the version_N it looked up: two runs starting together both write into it
    first, second = CSVLogger(tmp_path, name="sft"), CSVLogger(tmp_path, name="sft")
    assert first.version == second.version == 0 and not (tmp_path / "sft").exists()  # looking up writes nothing
    first.experiment, second.experiment  # noqa: B018 (the trainer's set-up claims the directory)
    assert (first.log_dir, second.log_dir) == (str(tmp_path / "sft" / "version_0"), str(tmp_path / "sft" / "version_1"))
    assert (tmp_path / "sft" / "version_0" / LOCK_FILE).is_file()


def test_a_version_taken_between_listing_and_creating_is_skipped(tmp_path, monkeypatch):
    CSVLogger(tmp_path, name="sft").claim()
    monkeypatch.setattr(CSVLogger, "_get_next_version", lambda self: 0)  # both listed before either created
    assert CSVLogger(tmp_path, name="sft").claim() == str(tmp_path / "sft" / "version_1")


def test_lock_holds_pid_host_and_job_and_is_released(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    path = acquire_run_lock(tmp_path)
    assert json.loads(path.read_text()) == {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": "42"}
    release_run_lock(tmp_path)
    assert not path.exists()


def test_a_live_run_holds_its_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with held_by_another_process(tmp_path, slurm_job_id="9") as pid:
        with pytest.raises(InputError, match=f"in use by a live run, pid {pid} on .* \\(Slurm job 9\\)"):
            acquire_run_lock(tmp_path)
        assert loggers.live_holder(tmp_path)["pid"] == pid
    assert loggers.live_holder(tmp_path) is None  # its lock went with it
    assert json.loads(acquire_run_lock(tmp_path).read_text())["pid"] == os.getpid()


def test_a_lock_file_nobody_holds_is_stale_whatever_it_names(tmp_path, monkeypatch):
    # a container restart changed the hostname, a resubmitted job landed on another node, the pid was reused: the
    # file's names say nothing about liveness, only the kernel's lock does
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_lock(tmp_path, pid=1, host="another-host", slurm_job_id="7")
    assert json.loads(acquire_run_lock(tmp_path).read_text())["host"] == socket.gethostname()
    release_run_lock(tmp_path)
    write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), slurm_job_id=None)  # a live (reused) pid
    assert loggers.live_holder(tmp_path) is None
    assert json.loads(acquire_run_lock(tmp_path).read_text())["pid"] == os.getpid()


def test_a_forked_child_outliving_its_run_does_not_hold_the_lock(tmp_path):
    # a DataLoader worker is forked with the run's descriptors and outlives a kill -9 of the run by seconds
    code = ("import os, sys, time\nfrom dynlab.tracking.loggers import acquire_run_lock\n"
            "acquire_run_lock(sys.argv[1])\npid = os.fork()\nif pid == 0:\n    os.close(1)\n    os.close(2)\n"
            "    time.sleep(60)\n    os._exit(0)\n"
            "print(pid, flush=True)\nos._exit(0)")  # the run dies without releasing
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    child = int(out)
    try:
        os.kill(child, 0)  # the child is still alive (this raises otherwise)
        assert loggers.live_holder(tmp_path) is None
    finally:
        os.kill(child, signal.SIGKILL)


def test_without_file_locking_the_lock_file_decides(tmp_path, monkeypatch, no_flock):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), slurm_job_id=None)
    with pytest.raises(InputError, match="in use by a live run, pid"):
        acquire_run_lock(tmp_path)
    write_lock(tmp_path, pid=1, host="another-host", slurm_job_id="7")  # cannot be checked from here: live
    with pytest.raises(InputError, match="another-host"):
        acquire_run_lock(tmp_path)
    write_lock(tmp_path, pid=dead_pid(), host=socket.gethostname(), slurm_job_id=None)  # killed with kill -9
    assert json.loads(acquire_run_lock(tmp_path).read_text())["pid"] == os.getpid()
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # requeued onto another node: the same job id
    write_lock(tmp_path, pid=os.getppid(), host="another-host", slurm_job_id="7")
    assert json.loads(acquire_run_lock(tmp_path).read_text())["host"] == socket.gethostname()
    (tmp_path / LOCK_FILE).write_text("")  # being written right now: held, unless left like that for a minute
    with pytest.raises(InputError, match="in use"):
        acquire_run_lock(tmp_path)
    os.utime(tmp_path / LOCK_FILE, (0, 0))
    assert json.loads(acquire_run_lock(tmp_path).read_text())["pid"] == os.getpid()
    release_run_lock(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_held_run_directory_is_refused_before_anything_is_written(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "held")
    run = Path("runs/sft/held")
    with held_by_another_process(run), pytest.raises(SystemExit) as exit_:
        main(TINY_SFT)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynlab: error: ") and "in use by a live run" in err[0]
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]


def test_a_resume_in_place_after_kill_9_takes_the_stale_lock_over(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "job")
    args = [*TINY_SFT, "--ckpt_path=last", "--trainer.max_steps=3"]
    with warnings.catch_warnings(record=True) as caught:  # the first start: nothing to resume, nothing to say
        warnings.simplefilter("always")
        main(args)
    assert not [w for w in caught if "no last checkpoint" in str(w.message)]
    run = Path("runs/sft/job")
    before = (run / "metrics.csv").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # the same directory again without --ckpt_path: would replace it
        main([*TINY_SFT, "--trainer.max_steps=3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"run directory {run} already holds a run" in err[0]
    assert (run / "metrics.csv").read_text() == before
    write_lock(run, pid=dead_pid(), host=socket.gethostname(), slurm_job_id=None)  # as a killed run leaves it
    main([*args[:-1], "--trainer.max_steps=6"])
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    assert sorted(steps) == [0, 1, 2, 3, 4, 5] and not (run / LOCK_FILE).exists()


@pytest.mark.parametrize("version", ["../..", "a/b", "/abs/path", "..", ".", "x\ny"])
def test_a_run_version_must_be_one_name(version):
    with pytest.raises(InputError, match="DYNLAB_RUN_VERSION"):
        check_run_version(version)


def test_a_bad_run_version_is_refused_in_one_line(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("DYNLAB_RUN_VERSION", "../..")
    with pytest.raises(SystemExit) as exit_:
        main(TINY_SFT)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'../..' is not a run directory name" in err[0]
    assert list(in_tmp.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("same_version", [False, True], ids=["auto", "same_DYNLAB_RUN_VERSION"])
def test_two_fits_started_at_once_never_share_a_directory(tmp_path, same_version):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if same_version:
        env["DYNLAB_RUN_VERSION"] = "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "dynlab.cli", *TINY_SFT], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [(p.communicate(timeout=600), p.returncode) for p in procs]
    done = [out for (out, _), rc in outs if rc == 0]
    refused = [err for (_, err), rc in outs if rc == 2]
    assert len(done) + len(refused) == 2
    if same_version:  # refused while the other runs, or after it finished (the directory then holds its run)
        assert len(done) == 1, refused
        assert re.search("in use by a live run|already holds a run", refused[0].strip().splitlines()[-1])
    else:
        assert len(done) == 2
    dirs = {line.split()[3] for out in done for line in out.splitlines() if line.startswith("dynlab: run directory")}
    assert len(dirs) == len(done)
    for run in dirs:
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            assert all(len(row) == len(header) for row in reader)
