"""When to try a source again after a transient failure, and what the status line says.

Pure: the session counts failures and measures time (its injected clock); this module
decides whether another attempt fits the retry window and after which delay. The
schedule repeats its last delay (``10, 20, 40, 80, 120`` → ``…, 120, 120``); a retry
starts only while it begins within ``window`` seconds of the source's first failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from zbackupd.core.status import human_duration


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``window`` seconds (0: no retries) and the delays before each retry, the last
    one repeated."""

    window: float
    backoff: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.window < 0 or not self.backoff or any(delay <= 0 for delay in self.backoff):
            raise ValueError(f"invalid retry policy: {self}")

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure (1-based) before the next attempt."""
        return self.backoff[min(max(failures, 1), len(self.backoff)) - 1]

    @property
    def max_attempts(self) -> int:
        """Attempts at most (the first included) if no attempt took any time: each retry
        must start within the window, counted from the first failure."""
        attempts, waited = 1, 0.0
        for delay in self.backoff:
            if waited + delay > self.window:
                return attempts
            waited += delay
            attempts += 1
        return attempts + int((self.window - waited) // self.backoff[-1])

    def next_delay(self, failures: int, since_first_failure: float) -> float | None:
        """The wait before the next attempt, or None when it would start outside the
        window (or the attempts are used up)."""
        if failures >= self.max_attempts:
            return None
        delay = self.delay(failures)
        if since_first_failure + delay > self.window:
            return None
        return delay


def retry_message(source: str, seconds: float, attempt: int, attempts: int, reason: str) -> str:
    """``retrying server nas in 40 s, attempt 3/8: <reason>`` (the status line)."""
    return f"retrying server {source} in {seconds:.0f} s, attempt {attempt}/{attempts}: {reason}"


def gave_up_message(reason: str, attempts: int, elapsed: float) -> str:
    """A transient failure that outlasted the window: what the run's outcome says."""
    if attempts <= 1:
        return reason
    return f"{reason} (gave up after {attempts} attempts in {human_duration(elapsed)})"
