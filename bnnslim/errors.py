"""Errors a user can act on.

Every expected failure raises :class:`BnnslimError` with a message that names the
problem and a hint that names the fix. The command line prints both on one line
and exits non-zero; library users catch the exception.
"""

from __future__ import annotations


class BnnslimError(Exception):
    """A problem with the user's input, files or environment (not a bug)."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message as the command line prints it."""
        if self.fix:
            return f"{self.problem.rstrip('.')}. {self.fix}"
        return self.problem


class BnnslimWarning(UserWarning):
    """Something the user should know that does not stop the command (the command line prints ``warning: ...``)."""
