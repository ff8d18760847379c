"""The error family the command line turns into one-line messages and exit codes."""
import re
from typing import Optional

# how torch's DataLoader re-raises an error of a worker process: the type, rebuilt from the whole worker traceback
_WORKER_PREFIX = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\n")


def worker_message(text: str, exc_type: type) -> Optional[str]:
    """The worker's own message inside the text DataLoader re-raises an `exc_type` with (its traceback's last
    line), or None when `text` is not such a re-raise."""
    found = _WORKER_PREFIX.match(text)
    if found is None or found.group(1) != exc_type.__name__:
        return None
    for name in (f"{exc_type.__module__}.{exc_type.__qualname__}", exc_type.__qualname__):
        at = text.rfind(f"\n{name}: ")
        if at >= 0:
            return text[at + len(name) + 3:].strip()
    return None


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message as one line (a DataLoader worker's own message when it came from one), or its type's
    name when it has none."""
    text = str(error).strip()
    text = worker_message(text, type(error)) or text
    return text.splitlines()[0][:limit] if text else type(error).__name__


class LeditError(Exception):
    """Base class: a problem the user can fix, reported as one line without a traceback.

    An error raised inside a DataLoader worker reaches the main process as the same class built from the worker's
    whole traceback; it keeps the worker's one-line message only, so it reads as the same error raised in process."""

    exit_code = 1

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (worker_message(args[0], type(self)) or args[0],)
        super().__init__(*args)


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
