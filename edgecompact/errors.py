"""The errors a user can cause. The CLI catches `UserError` once and prints it as one line.

Programming errors are not wrapped here: they stay tracebacks.
"""


class UserError(Exception):
    """A mistake in the user's input: a file, key, argument or budget. The message names it."""


class DataError(UserError):
    """A dataset file is missing, truncated or malformed."""


class ConfigError(UserError):
    """A target TOML, latency table, run directory or argument is invalid."""


class BudgetError(UserError):
    """A budget cannot be met (<= 0, above the baseline, or unreachable under the constraints)."""


class DeployError(UserError):
    """An export, compile or run step cannot be done with the given input or toolchain."""


class StorageError(UserError):
    """A file cannot be written: the disk is full, a quota or file-size limit is hit, or another process holds
    the run directory or table. The previous version of the file is kept."""
