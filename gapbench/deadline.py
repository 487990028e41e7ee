"""Wall-clock limits and SIGTERM: a long loop asks, at each safe point, whether to stop now.

A safe point is the end of a unit of work whose result is saved (a training epoch, a batch of
datapoints). :meth:`Deadline.should_stop` answers yes when SIGTERM has arrived or when the next unit,
if it takes as long as the last one did, would not end before the limit less a margin (the time to
save). Inside a unit, :meth:`Deadline.is_expired` says whether the limit itself (less the margin) has
passed; the unit is then abandoned and redone from its start on resume, which gives the same numbers
because every evaluation datapoint draws from its own random stream.

Every stretch makes progress: until one unit has finished in this process (:meth:`Deadline.progressed`),
only SIGTERM stops, so a limit shorter than start-up plus one unit is overrun by that unit rather than
repeating nothing forever.

The clock is injectable, so tests stop at exact points without sleeping.
"""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

MARGIN_SECONDS = 30.0  # at most this much of the limit is kept for saving
MARGIN_SHARE = 0.02  # and at most this share of it (a 10 s limit keeps 0.2 s)
_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")


class StopRequested(Exception):
    """A loop stopped at a safe point (time limit or SIGTERM); the message says what is done and what
    remains. Everything done before it is saved."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``45m``, ``2h30m``, ``1h5m10s`` or a plain number of seconds."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION.fullmatch(value)
        if not value or match is None or not any(match.groups()):
            raise ValueError(f"cannot read the duration {text!r}; write it as 90s, 45m or 2h30m") from None
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"the duration {text!r} must be positive; write it as 90s, 45m or 2h30m")
    return seconds


def format_duration(seconds: float) -> str:
    """``2h30m``, ``45m10s``, ``12.5s``."""
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")


class Deadline:
    """A wall-clock limit of ``seconds`` from creation (None: no limit) and the SIGTERM flag.

    ``clock``: seconds, monotonic (``time.monotonic``; tests pass their own). ``margin``: seconds kept
    for saving (default ``min(MARGIN_SECONDS, MARGIN_SHARE * seconds)``).
    """

    def __init__(self, seconds: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 margin: float | None = None):
        self.seconds = seconds
        self._clock = clock
        self.margin = (min(MARGIN_SECONDS, MARGIN_SHARE * seconds) if seconds else 0.0) if margin is None else margin
        self.end = clock() + seconds if seconds is not None else math.inf
        self.is_terminated = False  # SIGTERM arrived (see :meth:`handling_sigterm`)
        self._last_safe_point: float | None = None
        self.has_progressed = False  # a unit of work has finished in this process

    @property
    def is_limited(self) -> bool:
        return self.seconds is not None

    def reason(self) -> str:
        return "SIGTERM" if self.is_terminated else f"the time limit ({format_duration(self.seconds)})"

    def progressed(self) -> None:
        """A unit of work has finished and is saved."""
        self.has_progressed = True

    def begin(self) -> None:
        """Mark the start of a loop's first unit (its duration estimates the next one's)."""
        self._last_safe_point = self._clock() if self.is_limited else None

    def should_stop(self) -> bool:
        """At a safe point: stop if SIGTERM came or if one more unit as long as the last would end
        after the limit less the margin."""
        if self.is_terminated:
            return True
        if not self.is_limited or not self.has_progressed:
            return False
        now = self._clock()
        last = now - self._last_safe_point if self._last_safe_point is not None else 0.0
        self._last_safe_point = now
        return now + last + self.margin >= self.end

    def is_expired(self) -> bool:
        """Inside a unit: SIGTERM came or the limit less the margin has passed."""
        return self.is_terminated or (self.is_limited and self.has_progressed
                                      and self._clock() + self.margin >= self.end)

    @contextmanager
    def handling_sigterm(self) -> Iterator["Deadline"]:
        """While inside, SIGTERM sets :attr:`is_terminated` instead of ending the process (main thread
        only; elsewhere signals are left as they are). The previous handler comes back on exit."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def terminate(signum, frame) -> None:
            self.is_terminated = True

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


NO_DEADLINE = Deadline()
