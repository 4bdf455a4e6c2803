"""Exceptions for mistakes a user can fix.

The command line prints these as one message and exits non-zero, with no
traceback. Anything else that escapes is a bug in lowmem-moe.
"""


class UserError(Exception):
    """Bad input or environment, reported with what to do next."""


class ConfigError(UserError):
    """The merge YAML is invalid."""


class SourceError(UserError):
    """A source model folder or checkpoint file is missing or invalid."""


class PlanError(UserError):
    """The sources cannot be combined into the requested output."""


class OutputError(UserError):
    """The output folder cannot be written."""


class DiskFullError(OutputError):
    """The output disk filled up during the merge; the partial output is kept for a resume."""
