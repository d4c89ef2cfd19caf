"""One error type for bad user input: it names the file, row and field, and the CLI prints it as one line."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input a person can fix. ``str(err)`` is one line: ``FILE: row N: field 'F': message``.

    Args:
        message: what is wrong, and the fix when there is one.
        file: the file (or dataset id) the bad value came from.
        row: 1-based row (line for jsonl) in that file.
        field: the field name.
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        self.message, self.file, self.row, self.field = message, file, row, field
        parts = [p for p in (file, f"row {row}" if row is not None else None,
                             f"field '{field}'" if field is not None else None) if p]
        super().__init__(": ".join([*parts, message]).replace("\n", " "))
