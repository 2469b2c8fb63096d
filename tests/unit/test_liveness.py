"""The ack watchdog's decisions (usdp._liveness), without a device."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from usdp._liveness import PROBE_INTERVAL_MAX, TAIL_PROBE_MAX, AckWatch, Probe, Verdict


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


# --------------------------------------------------------------------- the stalled sender


def test_a_stalled_sender_is_probed_every_interval_after_the_last_progress() -> None:
    """The persist timer: the last send before the stall was acknowledged (nothing
    outstanding), so only a probe can tell whether the peer is still there."""
    w = AckWatch(0.0, ack_timeout=5.0)
    assert w.probe_interval == PROBE_INTERVAL_MAX == 1.0
    w.posted(0.0, signaled=True)
    w.completed(0.1)
    assert w.check(10.0) is Verdict.OK  # not stalled: an idle connection is left alone
    w.stalled = True
    assert w.check(1.09) is Verdict.OK
    assert w.check(1.1) is Verdict.PROBE
    assert w.probe_means(frame_ok=False) is Probe.READ
    w.probed(1.1)
    w.posted(1.1, signaled=True)  # the READ probe
    assert w.check(1.2) is Verdict.OK  # one at a time: it is outstanding
    w.completed(1.15)  # answered by the peer's HCA
    assert w.check(2.1) is Verdict.OK
    assert w.check(2.15) is Verdict.PROBE


def test_an_unanswered_probe_declares_the_stalled_senders_peer_dead() -> None:
    w = AckWatch(0.0, ack_timeout=2.0)
    w.stalled = True
    assert w.probe_interval == 1.0
    assert w.check(1.0) is Verdict.PROBE
    w.probed(1.0)
    w.posted(1.0, signaled=True)
    assert w.check(3.0) is Verdict.OK
    assert w.check(3.01) is Verdict.DEAD


def test_short_ack_timeout_probes_at_half_of_it() -> None:
    w = AckWatch(0.0, ack_timeout=0.4)
    w.stalled = True
    assert w.probe_interval == 0.2
    assert w.check(0.19) is Verdict.OK
    assert w.check(0.2) is Verdict.PROBE


def test_without_the_watchdog_a_stalled_sender_is_not_probed() -> None:
    w = AckWatch(0.0, ack_timeout=0.0)
    w.stalled = True
    assert w.check(1e6) is Verdict.OK


def test_a_stalled_sender_never_spends_a_credit_on_a_keepalive_frame() -> None:
    w = AckWatch(0.0, ack_timeout=5.0, keepalive=1.0)
    assert w.check(1.0) is Verdict.PROBE
    assert w.probe_means(frame_ok=True) is Probe.FRAME  # idle: the program hears it too
    w.stalled = True
    assert w.probe_means(frame_ok=True) is Probe.READ


def test_keepalive_without_credits_uses_the_credit_free_probe() -> None:
    """Issue 11 item 5: this probe used to be skipped for lack of credits."""
    w = AckWatch(0.0, ack_timeout=5.0, keepalive=2.0)
    assert w.check(2.0) is Verdict.PROBE
    assert w.probe_means(frame_ok=False) is Probe.READ


def test_outstanding_work_is_watched_already_so_no_read_probe_goes() -> None:
    w = AckWatch(0.0, ack_timeout=5.0, keepalive=2.0)
    w.posted(0.0, signaled=True)
    assert w.check(2.0) is Verdict.PROBE  # keepalive: silence from the peer
    assert w.probe_means(frame_ok=False) is None
    assert w.probe_means(frame_ok=True) is Probe.FRAME


TICK = 0.25


@given(st.floats(0.1, 30.0), st.floats(0.0, 20.0), st.floats(0.0, 3.0))
def test_a_dead_peer_is_found_within_ack_timeout_plus_an_interval(
        ack_timeout: float, death: float, answer: float) -> None:
    """A stalled sender ticked every TICK, acting on the verdicts as the endpoint does
    (READ probes answered ``answer`` s later while the peer lives, never after it dies
    at ``death``): DEAD comes at most ack_timeout + probe_interval + 2 ticks after the
    death, never before it, and never more than one probe is outstanding."""
    w = AckWatch(0.0, ack_timeout=ack_timeout)
    w.stalled = True
    answers: list[float] = []  # when the outstanding probe will be answered
    now = 0.0
    while True:
        now += TICK
        for t in [a for a in answers if a <= now]:
            answers.remove(t)
            w.completed(t)
        v = w.check(now)
        if v is Verdict.DEAD:
            break
        if v is Verdict.PROBE:
            w.probed(now)
            if w.probe_means(frame_ok=False) is Probe.READ:
                assert not answers and w.outstanding == 0
                w.posted(now, signaled=True)
                if now + answer < death:
                    answers.append(now + answer)
                else:
                    answers.append(float("inf"))  # lost with the peer
        assert w.outstanding <= 1
        assert now < death + ack_timeout + w.probe_interval + 2 * TICK + answer + 1
    assert now >= death or answer > ack_timeout  # a live peer that answers in time lives
    assert now <= death + ack_timeout + w.probe_interval + 2 * TICK + 1e-9
