"""The pure parts of transfer.py: progress arithmetic and which side gets the blame.

(Pure, so they could live in tests/unit; kept beside the transfer tests they explain.)
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbackupd.errors import CommandError
from zbackupd.server.remote import RemoteUnavailable
from zbackupd.server.transfer import Side, TransferProgress, _Outcome, blame, next_progress
from zbackupd.zfs.runner import CommandResult

OK = _Outcome(CommandResult(("x",), 0, b"", ""), None)
FAILED = _Outcome(CommandResult(("x",), 1, b"", "boom"), CommandError(("x",), 1, "boom"))
DROPPED = _Outcome(None, RemoteUnavailable("h", 22, "connection lost"))


def test_first_sample_rate_is_the_average_so_far() -> None:
    progress = next_progress(None, 300, 2.0, 1000)
    assert progress.rate == 150
    assert progress.eta == pytest.approx(700 / 150)
    assert progress.fraction == pytest.approx(0.3)


def test_later_samples_smooth_the_rate() -> None:
    first = TransferProgress(100, 1.0, 100.0, None, None)
    second = next_progress(first, 400, 2.0, None, smoothing=0.5)
    assert second.rate == pytest.approx(0.5 * 300 + 0.5 * 100)
    assert second.eta is None  # no estimate, no ETA
    assert second.fraction is None


def test_no_rate_means_no_eta() -> None:
    assert next_progress(None, 0, 0.0, 1000).eta is None


@given(
    st.integers(0, 10**12),
    st.integers(0, 10**12),
    st.floats(0.001, 10**5),
    st.floats(0.001, 10**5),
    st.integers(1, 10**12),
)
def test_eta_is_never_negative_and_fraction_stays_in_range(
    done1: int, more: int, t1: float, dt: float, estimate: int
) -> None:
    first = next_progress(None, done1, t1, estimate)
    second = next_progress(first, done1 + more, t1 + dt, estimate)
    for progress in (first, second):
        assert progress.rate >= 0
        assert progress.eta is None or progress.eta >= 0
        assert progress.fraction is not None
        assert 0 <= progress.fraction <= 1


@pytest.mark.parametrize(
    ("send", "receive", "first", "aborted", "expected"),
    [
        (OK, OK, "send", False, None),
        (FAILED, OK, "send", False, "send"),
        (OK, FAILED, "receive", False, "receive"),
        (FAILED, FAILED, "send", False, "send"),  # the receive saw a truncated stream
        (FAILED, FAILED, "receive", False, "receive"),  # the send saw EPIPE
        (DROPPED, FAILED, "receive", False, "send"),  # a dropped link explains everything
        (DROPPED, FAILED, "receive", True, "receive"),  # we closed the channel ourselves
        (DROPPED, OK, "receive", True, "send"),  # the send hung after a complete receive
    ],
)
def test_blame(
    send: _Outcome, receive: _Outcome, first: Side, aborted: bool, expected: Side | None
) -> None:
    assert blame(send, receive, first, send_aborted=aborted) == expected
