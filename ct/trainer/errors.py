"""The one error type that means "bad input": reported as one line, exit status 2."""


class UsageError(Exception):
    """Bad flags, data, checkpoint or budget; the message says what is wrong and what to do."""
