"""What a refused run raises: an error that names the culprit (flag, file and line, key, folder) and says what to do.
train.py prints it as one line and exits with status 1, instead of a traceback; anything else is a bug and keeps
its traceback."""


class Refusal(Exception):
    """Raised for bad input or an unusable setup, before any training or write where the check allows it."""


class InputError(Refusal, ValueError):
    """Bad flags, data, folders or checkpoints."""


class EngineError(Refusal, RuntimeError):
    """A distributed engine or process count that `accelerate launch` asked for and cannot have."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run: train.py says which checkpoint to continue from, in one line."""


class DiskFull(Refusal, OSError):
    """The output folder's disk filled up while writing (libraries report it in their own words: torch's
    "unexpected pos"); the message says so and which checkpoint is complete."""
