"""The solicitation, signaling and auto-cork rules of ``usdp._signaling``, one test per rule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from usdp._signaling import (
    SignalPolicy,
    should_cork,
    should_flush_cork,
    signal_send,
    solicit_data,
)

P = SignalPolicy(every=8, low_credits=2)
MAXP = 65520


def _solicit(last: bool = False, credits: int = 10, run: int = 0) -> bool:
    return solicit_data(P, last_of_burst=last, credits_after=credits, unsolicited_run=run)


def _signal(control: bool = False, run: int = 0, free: int = 8, credit: bool = True,
            inflight: int = 0, signaled: int = 0) -> bool:
    return signal_send(P, control=control, unsignaled_run=run, free_slots_after=free,
                       credit_ok_after=credit, inflight_before=inflight,
                       signaled_inflight=signaled)


# ---------------------------------------------------------------- solicitation


def test_mid_burst_data_with_credits_is_not_solicited() -> None:
    assert not _solicit()


def test_last_frame_of_a_burst_is_solicited() -> None:
    assert _solicit(last=True)


def test_frame_that_leaves_the_sender_short_of_credits_is_solicited() -> None:
    assert _solicit(credits=2)
    assert _solicit(credits=0)
    assert not _solicit(credits=3)


def test_every_nth_frame_of_a_long_burst_is_solicited() -> None:
    assert not _solicit(run=6)
    assert _solicit(run=7)


@given(st.lists(st.booleans(), min_size=1, max_size=200))
def test_a_sleeping_receiver_is_never_more_than_every_frames_from_a_wakeup(
        lasts: list[bool]) -> None:
    """Whatever the burst shape, no run of unsolicited frames reaches ``every``, and the
    final frame of the sequence is solicited."""
    run = 0
    for i, last in enumerate(lasts):
        final = last or i == len(lasts) - 1
        if _solicit(last=final, run=run):
            run = 0
        else:
            run += 1
        assert run < P.every
    assert run == 0


# ---------------------------------------------------------------- signaling


def test_plain_data_send_with_room_is_unsignaled() -> None:
    assert not _signal()


def test_control_frames_are_always_signaled() -> None:
    assert _signal(control=True)


def test_a_signaled_send_at_least_every_n() -> None:
    assert not _signal(run=6)
    assert _signal(run=7)


def test_last_free_slot_is_signaled() -> None:
    assert _signal(free=0)


def test_last_usable_credit_is_signaled() -> None:
    assert _signal(credit=False)


def test_first_send_behind_unsignaled_ones_is_signaled_for_the_cork() -> None:
    assert _signal(inflight=1, signaled=0)
    assert not _signal(inflight=1, signaled=1)
    assert not _signal(inflight=0, signaled=0)


# ---------------------------------------------------------------- auto-cork


def test_cork_only_small_sends_with_a_signaled_send_in_flight() -> None:
    assert should_cork(64, MAXP, nodelay=False, signaled_inflight=1)
    assert not should_cork(64, MAXP, nodelay=False, signaled_inflight=0)
    assert not should_cork(MAXP, MAXP, nodelay=False, signaled_inflight=1)


def test_nodelay_turns_corking_off() -> None:
    assert not should_cork(64, MAXP, nodelay=True, signaled_inflight=3)
    assert should_flush_cork(64, MAXP, nodelay=True, signaled_inflight=3)


def test_cork_flushes_when_the_pipe_drained_or_it_is_full() -> None:
    assert should_flush_cork(64, MAXP, nodelay=False, signaled_inflight=0)
    assert should_flush_cork(MAXP, MAXP, nodelay=False, signaled_inflight=2)
    assert not should_flush_cork(64, MAXP, nodelay=False, signaled_inflight=1)
    assert not should_flush_cork(0, MAXP, nodelay=False, signaled_inflight=0)


@given(st.integers(1, MAXP), st.booleans(), st.integers(0, 4))
def test_no_cork_is_stranded(nbytes: int, nodelay: bool, signaled: int) -> None:
    """A send is corked only when the cork will be flushed later: by a signaled send in
    flight now (its completion), and never with corking off."""
    if should_cork(nbytes, MAXP, nodelay=nodelay, signaled_inflight=signaled):
        assert signaled > 0 and not nodelay
        assert not should_flush_cork(nbytes, MAXP, nodelay=nodelay,
                                     signaled_inflight=signaled) or nbytes >= MAXP
        assert should_flush_cork(nbytes, MAXP, nodelay=nodelay, signaled_inflight=0)
