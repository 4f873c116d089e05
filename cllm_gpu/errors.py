"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""


class CLLMError(Exception):
    """A problem the user can fix (bad config, bad data, bad checkpoint, ...)."""
    # True: in a data-parallel job every rank raises it at the same point with the same
    # message, so the CLI prints it once (rank 0) and every rank exits normally; otherwise the
    # rank that raised it ends the whole job (distributed.abort_job)
    collective = False


class CollectiveError(CLLMError):
    """Raised by every rank together (distributed.Communicator.agree / check_same)."""
    collective = True


class ConfigError(CLLMError, ValueError):
    pass


class DataError(CLLMError):
    pass


class CheckpointError(CLLMError):
    pass


class NonFiniteError(CLLMError):
    collective = True  # the decision comes from global values: every rank stops at that step
