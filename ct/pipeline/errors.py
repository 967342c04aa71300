"""The host side's one error type for bad input."""


class PipelineError(Exception):
    """A problem the operator must fix; its text is the one line printed on stderr (exit 2)."""
