"""Errors a user can act on. The CLI prints them without a traceback and exits non-zero."""
from __future__ import annotations


class NumabenchError(Exception):
    """Base class: the message names what is wrong and what to do."""

    exit_code = 2


class TopologyError(NumabenchError):
    """The machine (or a --root tree) could not be read."""


class PlanError(NumabenchError):
    """A plan request or plan document is invalid. `where` is 'file:line: field' when known."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class LaunchError(NumabenchError):
    """Workers could not be started or a run failed."""

    exit_code = 1
