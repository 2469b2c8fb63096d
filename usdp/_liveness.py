"""Is the peer still there? The ack watchdog and the probes that feed it (sans-I/O).

usdp lets the QP retry forever (``_verbs.RETRY_CNT`` 7: with fewer retries rxe resets
healthy connections on 5 % loss), so a dead peer or link never produces an error
completion. Instead, as TCP_USER_TIMEOUT does for TCP, a signaled send (or RDMA read)
that sees no send-queue progress for ``ack_timeout`` seconds declares the peer dead. Only
the peer's kernel has to acknowledge, never its program: a peer that does not read is
alive.

The watchdog can only see signaled work, so it asks for a probe when nothing signaled
is outstanding but something should be checked: after ``keepalive`` seconds of silence
from the peer, after a burst of sends that ended unsignaled and was not followed by
anything, and, every :attr:`AckWatch.probe_interval`, while data waits to go and the
peer must act first (a sender out of credits, TCP's zero window). The last send before a
wait for credits is signaled, but once the peer's HCA acknowledged it nothing is
outstanding, and a peer that died after that would never be noticed: this is TCP's
persist timer, with ``ack_timeout`` as its TCP_USER_TIMEOUT.

A probe is one of two things (:meth:`AckWatch.probe_means`): a signaled KEEPALIVE frame,
which the peer's program hears too but which needs a credit and a send slot, or a
one-byte RDMA READ of a byte the peer offered in its Hello (a page of zeros), which the
peer's HCA answers with no receive buffer, hence no credit (docs/protocol.md, section 10a,
says why not a zero-length READ).
A sender waiting for credits always uses the READ: a frame would spend the credit its
data waits for.

Pure logic: the caller passes the time and reports posts, completions and frames heard;
:meth:`AckWatch.check` says what to do. The endpoint calls it from the completion
thread's tick.
"""

from __future__ import annotations

import enum

#: A burst that ended unsignaled is probed after min(TAIL_PROBE_MAX, ack_timeout / 4).
TAIL_PROBE_MAX = 1.0
#: A stalled sender probes every min(PROBE_INTERVAL_MAX, ack_timeout / 2) seconds after
#: the last send-queue progress, so a dead peer is reported at most
#: ``ack_timeout + probe_interval`` (plus a tick) after the last acknowledgement.
PROBE_INTERVAL_MAX = 1.0


class Verdict(enum.Enum):
    OK = "ok"
    PROBE = "probe"  # post a probe (see AckWatch.probe_means), then call probed()
    DEAD = "dead"  # no acknowledgement for ack_timeout: fail the connection


class Probe(enum.Enum):
    FRAME = "frame"  # a signaled KEEPALIVE frame: needs a credit and a send slot
    READ = "read"  # a signaled one-byte RDMA READ: answered by the peer's HCA alone


class AckWatch:
    """Liveness state of one connection; every method takes ``now`` (monotonic seconds)."""

    __slots__ = (
        "ack_timeout",
        "keepalive",
        "last_heard",
        "last_post",
        "outstanding",
        "since",
        "stalled",
        "tail",
    )

    def __init__(self, now: float, ack_timeout: float = 0.0, keepalive: float = 0.0) -> None:
        self.ack_timeout = ack_timeout  # 0: never declare the peer dead
        self.keepalive = keepalive  # 0: no probes after silence
        self.outstanding = 0  # signaled sends/reads posted and not completed
        self.since = now  # last send-queue progress, or when `outstanding` left 0
        self.tail = False  # the last post was unsignaled
        self.last_post = now
        self.last_heard = now  # a frame arrived, or a keepalive probe went out
        # Data waits to go and only the peer can unblock it (no credits): set by the
        # caller before each check.
        self.stalled = False

    @property
    def active(self) -> bool:
        """Whether ticks can do anything (else the caller need not tick)."""
        return self.ack_timeout > 0 or self.keepalive > 0

    @property
    def probe_interval(self) -> float:
        """Seconds between probes of a stalled sender (0 when the watchdog is off)."""
        return min(PROBE_INTERVAL_MAX, self.ack_timeout / 2)

    def posted(self, now: float, signaled: bool) -> None:
        self.last_post = now
        self.tail = not signaled
        if signaled:
            if not self.outstanding:
                self.since = now
            self.outstanding += 1

    def unposted(self, signaled: bool) -> None:
        """The post just reported failed after all."""
        if signaled and self.outstanding:
            self.outstanding -= 1

    def completed(self, now: float) -> None:
        """A send completion (any status): the send queue moved."""
        if self.outstanding:
            self.outstanding -= 1
        self.since = now

    def heard(self, now: float) -> None:
        """A frame arrived from the peer."""
        self.last_heard = now

    def probed(self, now: float) -> None:
        """A PROBE verdict was acted on (it counts as heard: one keepalive probe per
        interval). Call it also when :meth:`probe_means` said None."""
        self.last_heard = now

    def check(self, now: float) -> Verdict:
        if self.ack_timeout and self.outstanding and now - self.since > self.ack_timeout:
            return Verdict.DEAD
        if self.keepalive and now - self.last_heard >= self.keepalive:
            return Verdict.PROBE
        if self.ack_timeout and not self.outstanding:
            if self.tail and now - self.last_post >= min(TAIL_PROBE_MAX,
                                                         self.ack_timeout / 4):
                return Verdict.PROBE
            if self.stalled and now - self.since >= self.probe_interval:
                return Verdict.PROBE  # the persist timer: a zero window is probed
        return Verdict.OK

    def probe_means(self, frame_ok: bool) -> Probe | None:
        """How to act on PROBE. ``frame_ok``: a credit and a send slot would carry a
        KEEPALIVE frame now.

        A frame when it can go (the peer's program hears it too), unless a sender is
        stalled (its data needs the credit). Otherwise the credit-free READ, but only
        when nothing signaled is outstanding: outstanding work is already watched, and so
        at most one READ probe is ever in flight. None: nothing to post.
        """
        if frame_ok and not self.stalled:
            return Probe.FRAME
        if not self.outstanding:
            return Probe.READ
        return None
