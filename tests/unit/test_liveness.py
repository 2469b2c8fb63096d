"""The ack watchdog's decisions (usdp._liveness), without a device."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from usdp._liveness import TAIL_PROBE_MAX, AckWatch, Verdict


def test_idle_connection_without_keepalive_is_left_alone() -> None:
    w = AckWatch(0.0, ack_timeout=5.0)
    assert w.check(1e6) is Verdict.OK


def test_unacknowledged_signaled_send_declares_the_peer_dead() -> None:
    w = AckWatch(0.0, ack_timeout=5.0)
    w.posted(10.0, signaled=True)
    assert w.check(15.0) is Verdict.OK
    assert w.check(15.01) is Verdict.DEAD


def test_progress_restarts_the_clock_and_the_last_completion_clears_it() -> None:
    w = AckWatch(0.0, ack_timeout=5.0)
    w.posted(0.0, signaled=True)
    w.posted(1.0, signaled=True)
    w.completed(4.0)  # the first one: progress at 4 s, one still outstanding
    assert w.check(8.9) is Verdict.OK
    assert w.check(9.1) is Verdict.DEAD
    w.completed(9.0)
    assert w.outstanding == 0 and w.check(100.0) is Verdict.OK


def test_clock_starts_at_the_first_outstanding_post_not_at_an_old_completion() -> None:
    w = AckWatch(0.0, ack_timeout=5.0)
    w.posted(0.0, signaled=True)
    w.completed(1.0)
    w.posted(50.0, signaled=True)  # long idle in between: not counted against the peer
    assert w.check(54.0) is Verdict.OK


def test_a_burst_that_ended_unsignaled_gets_probed() -> None:
    w = AckWatch(0.0, ack_timeout=8.0)
    w.posted(1.0, signaled=False)
    assert w.check(1.5) is Verdict.OK
    assert w.check(1.0 + TAIL_PROBE_MAX) is Verdict.PROBE
    w.posted(2.0, signaled=True)  # the probe
    assert w.check(2.5) is Verdict.OK


def test_short_ack_timeout_probes_the_tail_sooner() -> None:
    w = AckWatch(0.0, ack_timeout=0.4)
    w.posted(0.0, signaled=False)
    assert w.check(0.09) is Verdict.OK
    assert w.check(0.1) is Verdict.PROBE


def test_keepalive_probes_after_silence_and_hearing_resets_it() -> None:
    w = AckWatch(0.0, ack_timeout=0.0, keepalive=2.0)
    assert w.check(1.9) is Verdict.OK
    w.heard(1.9)
    assert w.check(3.8) is Verdict.OK
    assert w.check(3.9) is Verdict.PROBE
    w.probed(3.9)
    assert w.check(4.0) is Verdict.OK


def test_zero_ack_timeout_never_declares_death() -> None:
    w = AckWatch(0.0, ack_timeout=0.0)
    w.posted(0.0, signaled=True)
    w.posted(0.0, signaled=False)
    assert w.check(1e9) is Verdict.OK
    assert not w.active


def test_a_failed_post_is_taken_back() -> None:
    w = AckWatch(0.0, ack_timeout=1.0)
    w.posted(0.0, signaled=True)
    w.unposted(signaled=True)
    assert w.outstanding == 0 and w.check(10.0) is Verdict.OK


@given(st.lists(st.tuples(st.sampled_from(["post", "sig", "done", "heard"]),
                          st.floats(0, 10)), max_size=60))
def test_dead_only_after_ack_timeout_without_progress(ops: list[tuple[str, float]]) -> None:
    """Whatever the history, DEAD means: something signaled is outstanding and neither a
    completion nor the first of those posts happened within ack_timeout."""
    w = AckWatch(0.0, ack_timeout=3.0)
    now = 0.0
    progress = 0.0  # the latest completion, or the post that made `outstanding` 1
    for op, dt in ops:
        now += dt
        if op == "post":
            w.posted(now, signaled=False)
        elif op == "sig":
            if w.outstanding == 0:
                progress = now
            w.posted(now, signaled=True)
        elif op == "done":
            w.completed(now)
            progress = now
        else:
            w.heard(now)
        v = w.check(now)
        assert (v is Verdict.DEAD) == (w.outstanding > 0 and now - progress > 3.0)
        assert w.outstanding >= 0
