"""The error family the command line turns into one-line messages and exit codes."""


class LeditError(Exception):
    """Base class: a problem the user can fix, reported as one line without a traceback."""

    exit_code = 1


class CheckpointError(LeditError):
    """A file or folder that is not a readable, supported DiT/LEDiT checkpoint."""

    exit_code = 2


class ConfigError(LeditError):
    """Bad options, recipe values or model settings."""

    exit_code = 3


class DataError(LeditError):
    """An unreadable dataset, a label the model does not have, or images that do not fit the model."""

    exit_code = 4


class OutputExistsError(LeditError):
    """The output already exists and --overwrite was not given."""

    exit_code = 5
