"""Preference data: formats, the embedded synthetic set, probe construction, tokenization and the data module."""

from dynlab.data.datamodule import ProbeDataModule

__all__ = ["ProbeDataModule"]
