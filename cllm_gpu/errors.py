"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""


class CLLMError(Exception):
    """A problem the user can fix (bad config, bad data, bad checkpoint, ...)."""


class ConfigError(CLLMError, ValueError):
    pass


class DataError(CLLMError):
    pass


class CheckpointError(CLLMError):
    pass


class NonFiniteError(CLLMError):
    pass
