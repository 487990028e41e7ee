"""The one exception type of the data layer."""

from gapbench.errors import GapbenchError


class DataError(GapbenchError):
    """A dataset file or value is missing, malformed or out of range.

    The message always says what is wrong (naming the file or array) and how to fix it, so that
    the command line can print it as it is.
    """
