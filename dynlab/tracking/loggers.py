"""A CSV logger that survives resuming into the same run directory (a requeued Slurm job, ``--ckpt_path=last``).

Lightning's CSVLogger deletes an existing metrics.csv when it starts; this one keeps the rows logged before the
checkpoint the run resumed from and drops only those the resumed run logs again.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ResumableWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        self._previous: list[dict[str, str]] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self._previous = list(csv.DictReader(f))

    def save(self) -> None:
        if self._previous and self.metrics:
            # the resumed run logs again from its first step on: keep only the older rows
            first = min(int(m["step"]) for m in self.metrics)
            kept = [r for r in self._previous if r.get("step") and int(float(r["step"])) < first]
            keys = sorted({k for r in kept for k in r} | {k for m in self.metrics for k in m})
            self.metrics_keys = keys
            tmp = self.metrics_file_path + ".tmp"
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, self.metrics_file_path)
            self._previous = []
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
