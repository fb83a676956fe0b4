"""Errors raised by the client SDK for bad local input: data files, model directories.

Data errors carry the file and the 1-based line so an institution's operator can fix the record.
"""

from __future__ import annotations

from pathlib import Path

from fl_core.errors import FLError


class DataFormatError(FLError, ValueError):
    """A training-data record that is malformed: bad JSON, a missing field, a wrong type."""

    def __init__(self, path: str | Path, line: int, problem: str, unit: str = "line") -> None:
        self.path = str(path)
        self.line = line  # 1-based line, or record number when ``unit`` is "record"
        self.problem = problem
        where = f"{self.path}:{line}" if unit == "line" else f"{self.path}: record {line}"
        super().__init__(f"{where}: {problem}")


class ChatTemplateError(FLError, ValueError):
    """A conversation the tokenizer's chat template cannot render with its answers marked."""


class EmptyDatasetError(FLError, ValueError):
    """A data set with no usable example (an empty file, or every example truncated away)."""


class ModelLoadError(FLError, ValueError):
    """A model directory that is missing or does not hold a causal language model."""


class WorkloadError(FLError, ValueError):
    """A simulation whose data sources disagree: institution counts, or preference pairs that
    do not go with the stage or the SFT data."""
