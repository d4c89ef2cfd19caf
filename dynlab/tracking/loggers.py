"""A CSV logger that owns its run directory and survives resuming into it (a requeued Slurm job, ``--ckpt_path=last``).

Lightning's CSVLogger deletes an existing metrics.csv when it starts; this one keeps the rows logged before the
checkpoint the run resumed from and drops only those the resumed run logs again. A checkpoint written from
``on_train_batch_end`` is one row ahead of the loggers; the module carries that row in it and replays it here.

Lightning picks ``version_N`` by listing the directory, so two runs started at once take the same one. Here rank 0
creates ``version_N`` with ``os.mkdir`` (taking ``N+1`` when another run got there first) and holds a lock file with
its pid, host and Slurm job id in the run directory until the run ends; a directory that another live run holds is
refused (the lock is an ``flock`` held for the run's lifetime, so a dead run's lock frees itself). Other ranks never
guess a version: they get rank 0's directory once the process group exists (``trainer.log_dir`` and ModelCheckpoint
broadcast it, and ``dynlab fit`` hands each CSVLogger rank 0's version).
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from dynlab.errors import InputError

LOCK_FILE = "dynlab.lock"


def check_run_version(version: str) -> str:
    """A fixed run directory name (``DYNLAB_RUN_VERSION``) must be one name inside the stage directory."""
    seps = {"/", os.sep, os.altsep} - {None}
    if not version or version in (".", "..") or any(c in version for c in seps) or not version.isprintable():
        raise InputError(f"{version!r} is not a run directory name: give one name without path separators, "
                         "e.g. DYNLAB_RUN_VERSION=slurm-1234 (the directory lands in <default_root_dir>/<stage>/)",
                         field="DYNLAB_RUN_VERSION")
    return version


def _this_holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or garbage: treated as held


def live_holder(run_dir: str | os.PathLike) -> dict | None:
    """The live run holding ``run_dir`` (its lock file's pid/host/slurm_job_id, for the message), or None if free.

    A run holds an exclusive ``flock`` on its open lock file for its whole lifetime, so liveness is a non-blocking
    lock attempt: the kernel drops the lock when the holder dies however it dies (also across NFS, where lockd
    runs), and a dead run's file, a reused pid or a changed hostname mislead nobody. Where the file system does not
    lock, the file's contents decide (:func:`_is_live`).
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_lock(path) or {}
    except OSError as err:
        if err.errno not in _NO_LOCKING:
            raise
        holder = _read_lock(path)
        return holder if _is_live(holder, path) else None
    finally:
        os.close(fd)
    return None


_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
_HELD: dict[str, int] = {}  # lock file -> the open descriptor whose flock this process holds


def _forget_held_locks() -> None:
    """In a forked child (a DataLoader worker): drop its copies of the lock descriptors (closing, not unlocking), so
    the lock lives exactly as long as the run's own process, not as long as an orphaned worker."""
    for fd in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_held_locks)


def _is_live(holder: dict | None, path: Path) -> bool:
    """Liveness from the lock file's contents alone, where the file system cannot lock: a lock is stale when it is
    this process's own, when its Slurm job id is this process's (the job was requeued: Slurm ended the old
    allocation first, on whatever host it ran), or when it is on this host and its pid is dead. A lock from another
    host outside the same Slurm job counts as live: that pid cannot be checked from here."""
    if holder is None:
        return False
    if not holder:  # unreadable: being written right now, unless it has been like that for a minute
        try:
            return time.time() - path.stat().st_mtime < 60
        except FileNotFoundError:
            return False
    me = _this_holder()
    if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
        return False
    if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return False
    return not (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
                and not _pid_alive(holder["pid"]))


def _refuse(run_dir: str | os.PathLike, holder: dict) -> InputError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" + (
        f" (Slurm job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else "")
    return InputError(f"run directory {run_dir} is in use by a live run, {who}: choose another DYNLAB_RUN_VERSION "
                      f"(or none), or delete {Path(run_dir) / LOCK_FILE} if that run is dead",
                      field="DYNLAB_RUN_VERSION")


def holds_a_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a run's results (a metrics.csv or a checkpoint), which a new run would replace."""
    run_dir = Path(run_dir)
    return (run_dir / "metrics.csv").is_file() or any((run_dir / "checkpoints").glob("*.ckpt")) or any(
        run_dir.glob("hpc_ckpt_*.ckpt"))


def refuse_finished(run_dir: str | os.PathLike) -> InputError:
    return InputError(f"run directory {run_dir} already holds a run (metrics.csv, checkpoints): resume it with "
                      "--ckpt_path=last, or choose another DYNLAB_RUN_VERSION (or none)", field="DYNLAB_RUN_VERSION")


def check_run_dir(save_dir: str | os.PathLike, name: str | None, version: int | str | None,
                  resuming: bool = True) -> None:
    """Refuse (on rank 0) a fixed run directory that is not one name, that another live run holds, or (when not
    ``resuming``) that already holds a run, before the run writes anything."""
    if isinstance(version, str):
        check_run_version(version)
    if version is not None and rank_zero_only.rank == 0:
        run_dir = Path(save_dir, name or "", version if isinstance(version, str) else f"version_{version}")
        holder = live_holder(run_dir)
        if holder is not None:
            raise _refuse(run_dir, holder)
        if not resuming and holds_a_run(run_dir):
            raise refuse_finished(run_dir)


def acquire_run_lock(run_dir: str | os.PathLike) -> Path:
    """Lock ``run_dir`` for this process (an exclusive flock on its lock file, held until
    :func:`release_run_lock` or the process's end; the file names pid, host and Slurm job for the messages);
    refuse it when a live run holds it."""
    path = Path(run_dir) / LOCK_FILE
    if str(path) in _HELD:
        return path
    for attempt in range(20):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if attempt < 4:  # another run's live_holder probing it for a moment
                time.sleep(0.05)
                continue
            raise _refuse(run_dir, _read_lock(path) or {}) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKING:
                raise
            return _acquire_unlocked(path)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released (removed) it between our open and our lock: try again
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_this_holder()).encode())
        _HELD[str(path)] = fd
        return path
    raise _refuse(run_dir, _read_lock(path) or {})


def _acquire_unlocked(path: Path) -> Path:
    """:func:`acquire_run_lock` where the file system cannot lock: the file, created exclusively, is the lock."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if _is_live(holder, path):
                raise _refuse(path.parent, holder) from None
            # stale: move it aside under a name of our own; if what was moved is no longer the stale lock (another
            # run took it over in between), put that run's lock back
            aside = path.with_name(f"{LOCK_FILE}.stale-{socket.gethostname()}-{os.getpid()}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                continue
            if _read_lock(aside) != holder:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
            aside.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_this_holder(), f)
        return path
    raise _refuse(path.parent, _read_lock(path) or {})


def release_run_lock(run_dir: str | os.PathLike) -> None:
    """Remove ``run_dir``'s lock if this process holds it (removed before it is unlocked, so a run that opened the
    old file in between sees it is gone and makes a new one)."""
    path = Path(run_dir) / LOCK_FILE
    fd = _HELD.pop(str(path), None)
    if fd is not None:
        path.unlink(missing_ok=True)
        os.close(fd)
        return
    holder = _read_lock(path)
    me = _this_holder()
    if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
        path.unlink(missing_ok=True)


class _ResumableWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        self._previous: list[dict[str, str]] = []
        self._replayed: list[dict] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self._previous = list(csv.DictReader(f))

    def save(self) -> None:
        if (self._previous or self._replayed) and self.metrics:
            # the resumed run logs again from its first step on: keep only the older rows, then the replayed ones
            # the previous run never wrote (a row already there has the same values)
            first = min(int(m["step"]) for m in self.metrics)
            kept: list[dict] = [r for r in self._previous if r.get("step") and int(float(r["step"])) < first]
            for row in self._replayed:
                same_step = [r for r in kept if int(float(r["step"])) == row["step"]]
                if row["step"] < first and not any(all(r.get(k) for k in row) for r in same_step):
                    kept.append(row)
            keys = sorted({k for r in kept for k in r} | {k for m in self.metrics for k in m})
            self.metrics_keys = keys
            tmp = self.metrics_file_path + ".tmp"
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, self.metrics_file_path)
            self._previous, self._replayed = [], []
        super().save()


class CSVLogger(_CSVLogger):
    """Lightning's CSVLogger, allocating its run directory atomically, locking it while the run is live, and keeping
    the metrics logged before a resume into the same directory.

    Args:
        save_dir: the root of the stage directories; None: the trainer's ``default_root_dir`` (``dynlab fit`` fills
            it in; ``runs`` by default).
        version: a fixed run directory name (a requeued job resumes in it), or None for the next free ``version_N``.
    """

    def __init__(self, save_dir: str | None = None, name: str | None = "lightning_logs",
                 version: int | str | None = None, prefix: str = "", flush_logs_every_n_steps: int = 100):
        save_dir = save_dir if save_dir is not None else "runs"
        check_run_dir(save_dir, name, version)
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._locked: Path | None = None
        self._auto = version is None

    def _dir_of(self, version: int | str) -> str:
        return os.path.join(self.root_dir, version if isinstance(version, str) else f"version_{version}")

    @property
    def version(self) -> int | str | None:
        """The run directory's version: on rank 0 until ``claim`` a free one is only looked up (as Lightning does),
        so reading ``log_dir`` before the run starts writes nothing. Other ranks never guess one (rank 0 may have
        taken it already): None until :meth:`adopt_version` gives them rank 0's, unless the version is fixed."""
        if self._auto and self._locked is None:
            if rank_zero_only.rank != 0:
                return self._version  # None until adopted
            return self._get_next_version()
        return self._version

    def adopt_version(self, version: int | str | None) -> None:
        """On ranks other than 0: rank 0's version, broadcast once the process group exists."""
        if rank_zero_only.rank != 0 and version is not None:
            self._version = version

    def claim(self, resuming: bool = True) -> str:
        """Make the run directory this run's (rank 0, once): a free ``version_N`` is created with ``os.mkdir``, so
        no other run can take it (``N+1`` if one got there first), and the directory is locked until ``finalize``.
        A fixed directory that already holds a run is refused unless ``resuming`` (checked under the lock, so two
        runs started together cannot both pass). Runs when the trainer sets up (the first use of ``experiment``)
        or when ``dynlab fit`` starts."""
        if self._locked is None and rank_zero_only.rank == 0:
            if self._auto:
                os.makedirs(self.root_dir, exist_ok=True)
                n = self._get_next_version()
                while True:
                    try:
                        os.mkdir(self._dir_of(n))
                        break
                    except FileExistsError:
                        n += 1
                self._version = n
            log_dir = self._dir_of(self._version)
            os.makedirs(log_dir, exist_ok=True)
            self._locked = acquire_run_lock(log_dir)
            atexit.register(release_run_lock, log_dir)
            if not self._auto and not resuming and holds_a_run(log_dir):
                release_run_lock(log_dir)
                self._locked = None
                raise refuse_finished(log_dir)
        return self.log_dir

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._locked is not None:
            release_run_lock(self._locked.parent)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self.claim()
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_replayed_row(self, metrics: dict[str, float], step: int) -> None:
        """A row the checkpoint carried: written unless the previous run's file already has it."""
        self.experiment._replayed.append({**metrics, "step": step})
