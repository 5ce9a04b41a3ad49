"""One exception type for mistakes a user can fix (bad file, bad config, bad flag).

main.py catches it, prints the message as one paragraph and exits non-zero without a traceback.
Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: its message must say what is wrong and where."""


class DataError(UserError):
    """A data file is missing, unreadable or not in the MulT layout."""


class ConfigError(UserError):
    """A config file or --set override is invalid."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or belongs to another model/config."""


class NonFiniteError(UserError):
    """Training produced a NaN or infinite loss, or a checkpoint holds non-finite weights."""
