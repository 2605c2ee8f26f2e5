"""Errors that carry a message meant for the person running the workflow."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: a file that is missing, unreadable or does not follow its format.

    The message always names the file (when there is one) and the problem.
    """

    def __init__(self, problem: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)
