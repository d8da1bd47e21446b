"""Errors that reach the user as one clear line: what is wrong and how to fix it."""


class RLSpecError(Exception):
    """Base class for user-facing errors. Entry points print ``str(err)`` on one line and exit 2."""


class ConfigError(RLSpecError):
    """A config key or value is wrong. The message names the key and the fix."""


class DataError(RLSpecError):
    """A data file is missing or a row is malformed. The message names the file/row and the fix."""


class ModelLoadError(RLSpecError):
    """A model path or hub id cannot be loaded. The message names the path and the fix."""


class TrainingError(RLSpecError):
    """Training hit a state it must not continue from (e.g. a NaN loss)."""


class RunDirBusyError(RLSpecError):
    """Another process holds the run directory's lock. The message names its pid and host."""


class CheckpointError(RLSpecError):
    """A checkpoint cannot be written (disk full) or none verifies. The message names the file and the fix."""
