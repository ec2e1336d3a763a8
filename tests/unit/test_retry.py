"""The retry window and backoff schedule of a source after a transient failure (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbackupd.core.retry import RetryPolicy, gave_up_message, retry_message
from zbackupd.core.status import DaemonStatus, DiskStatus, Phase, status_line

DEFAULT = RetryPolicy(600, (10, 20, 40, 80, 120))


def test_the_default_schedule_allows_eight_attempts_in_ten_minutes() -> None:
    # 10 + 20 + 40 + 80 + 120 + 120 + 120 = 510 s of waiting; one more 120 would be 630.
    assert DEFAULT.max_attempts == 8
    assert [DEFAULT.delay(n) for n in range(1, 9)] == [10, 20, 40, 80, 120, 120, 120, 120]


def test_a_retry_must_start_within_the_window_counted_from_the_first_failure() -> None:
    assert DEFAULT.next_delay(1, 0) == 10
    assert DEFAULT.next_delay(3, 100) == 40
    assert DEFAULT.next_delay(3, 561) is None  # slow attempts used the window up
    assert DEFAULT.next_delay(8, 0) is None


def test_a_window_of_zero_means_one_attempt() -> None:
    policy = RetryPolicy(0, (10,))
    assert policy.max_attempts == 1
    assert policy.next_delay(1, 0) is None


def test_an_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(-1, (10,))
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(60, ())
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(60, (10, 0))


@given(st.integers(0, 10_000), st.lists(st.integers(1, 600), min_size=1, max_size=6))
def test_the_waits_of_all_attempts_fit_the_window(window: int, backoff: list[int]) -> None:
    policy = RetryPolicy(window, tuple(backoff))
    waited, failures = 0.0, 1
    while (delay := policy.next_delay(failures, waited)) is not None:
        waited += delay
        failures += 1
    assert waited <= window
    assert failures == policy.max_attempts


def test_the_status_line_says_which_server_when_and_which_attempt() -> None:
    message = retry_message("nas", 40, 3, 8, "SSH connection to nas:22 unavailable: timeout")
    assert message == ("retrying server nas in 40 s, attempt 3/8: SSH connection to nas:22 "
                       "unavailable: timeout")
    disk = DiskStatus("offsite-a", "S", Phase.RETRYING, message=message)
    line = status_line(DaemonStatus(locked=False).with_disk(disk))
    assert line == f"backing up offsite-a: {message}"


def test_what_a_given_up_source_says() -> None:
    assert gave_up_message("refused", 1, 0) == "refused"
    assert gave_up_message("refused", 8, 630) == "refused (gave up after 8 attempts in 10m30s)"
