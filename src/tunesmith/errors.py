"""Errors a user can fix. The CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: a file, a config key, a model name, a flag.

    The message must say where (file, line, field) and what to do about it.
    """

    exit_code = 2


class DataError(UserError):
    """A dataset record that cannot be used, located by file and line (or index) and field."""

    def __init__(self, path, where: str | int | None, field: str | None, problem: str, hint: str = ""):
        self.path, self.where, self.field, self.problem = str(path), where, field, problem
        loc = self.path
        if where is not None:
            loc += f", line {where}" if isinstance(where, int) else f", {where}"
        if field:
            loc += f", field '{field}'"
        msg = f"{loc}: {problem}"
        if hint:
            msg += f"\n  hint: {hint}"
        super().__init__(msg)
