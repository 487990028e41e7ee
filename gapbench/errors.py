"""The errors gapbench raises for input it cannot use.

Every one derives from :class:`GapbenchError`, and its message names the problem and the fix, so the
``gapbench`` command catches that one class and prints the message as it is (exit code 2). Each also
keeps the built-in base it has always had (``ValueError``, ``RuntimeError``), so ``except ValueError``
around a gapbench call still catches a bad configuration.

The errors of one layer live in it (``gapbench.data.DataError``, ``gapbench.commands.check.CheckError``,
...); the two that several layers raise live here.
"""

from __future__ import annotations


class GapbenchError(Exception):
    """Input gapbench cannot use (a file, a value, a run folder); the message says what is wrong and how
    to fix it."""


class ConfigError(GapbenchError, ValueError):
    """A configuration that cannot be run; the message names the key and the fix."""


class RunError(GapbenchError, RuntimeError):
    """A run that cannot go on as asked (folder clash, unusable checkpoint); the message says why."""


__all__ = ["ConfigError", "GapbenchError", "RunError"]
