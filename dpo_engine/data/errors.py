"""Exceptions of the data layer.

Whole-file problems raise `DataFormatError` (or a subclass carrying details for the UI's column
mapper) with a one-line human message; row-level problems never raise, they go into the
validation report instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpo_engine.data.report import ValidationReport


class DataFormatError(ValueError):
    """The input as a whole cannot be used (empty, binary, unknown format, missing columns...)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class MissingColumnsError(DataFormatError):
    """Required columns are absent; carries what was found so a mapping can be offered."""

    def __init__(
        self,
        message: str,
        *,
        columns_found: list[str],
        missing: list[str],
        suggested_mapping: dict[str, str],
    ):
        super().__init__(message)
        self.columns_found = columns_found
        self.missing = missing
        self.suggested_mapping = suggested_mapping


class NoUsableRowsError(DataFormatError):
    """Every row was unusable; the full report is attached so its row numbers can be shown."""

    def __init__(self, message: str, *, report: "ValidationReport"):
        super().__init__(message)
        self.report = report


class DatasetNotFound(KeyError):
    """No stored dataset has this id or name."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class DatasetExists(ValueError):
    """A dataset with this name is already registered (names must stay unambiguous)."""


class WorkspaceFull(OSError):
    """The workspace's disk (or quota) filled while writing; nothing half-written was left behind."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "the workspace disk is full"
