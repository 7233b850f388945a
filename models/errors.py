"""The one exception type for bad input, so the CLI, the server models and the tests can tell
"the caller sent something wrong" (a clear message, exit code 2, a per-request Triton error)
from a bug (a traceback)."""


class InputError(ValueError):
    """Bad input: the message names the input that was wrong and what was expected."""
