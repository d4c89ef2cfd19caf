"""A CSV logger that survives resuming into the same run directory (a requeued Slurm job, ``--ckpt_path=last``).

Lightning's CSVLogger deletes an existing metrics.csv when it starts; this one keeps the rows logged before the
checkpoint the run resumed from and drops only those the resumed run logs again. A checkpoint written from
``on_train_batch_end`` is one row ahead of the loggers; the module carries that row in it and replays it here.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


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
    """Lightning's CSVLogger, keeping the metrics logged before a resume into the same directory."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_replayed_row(self, metrics: dict[str, float], step: int) -> None:
        """A row the checkpoint carried: written unless the previous run's file already has it."""
        self.experiment._replayed.append({**metrics, "step": step})
