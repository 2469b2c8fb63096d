"""Is the peer still there? The ack watchdog and the probes that feed it (sans-I/O).

usdp lets the QP retry forever (``_verbs.RETRY_CNT`` 7: with fewer retries rxe resets
healthy connections on 5 % loss), so a dead peer or link never produces an error
completion. Instead, as TCP_USER_TIMEOUT does for TCP, a signaled send (or RDMA read)
that sees no send-queue progress for ``ack_timeout`` seconds declares the peer dead. Only
the peer's kernel has to acknowledge, never its program: a peer that does not read is
alive.

The watchdog can only see signaled work, so it asks for a probe (a signaled KEEPALIVE)
when nothing signaled is outstanding but something should be checked: after
``keepalive`` seconds of silence from the peer, and after a burst of sends that ended
unsignaled and was not followed by anything. (The endpoint also signals the last send
before it waits for credits or send slots, so a blocked sender is always covered.)

Pure logic: the caller passes the time and reports posts, completions and frames heard;
:meth:`AckWatch.check` says what to do. The endpoint calls it from the completion
thread's tick.
"""

from __future__ import annotations

import enum

#: A burst that ended unsignaled is probed after min(TAIL_PROBE_MAX, ack_timeout / 4).
TAIL_PROBE_MAX = 1.0


class Verdict(enum.Enum):
    OK = "ok"
    PROBE = "probe"  # post a signaled KEEPALIVE, if credits and a send slot allow
    DEAD = "dead"  # no acknowledgement for ack_timeout: fail the connection


class AckWatch:
    """Liveness state of one connection; every method takes ``now`` (monotonic seconds)."""

    __slots__ = (
        "ack_timeout",
        "keepalive",
        "last_heard",
        "last_post",
        "outstanding",
        "since",
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

    @property
    def active(self) -> bool:
        """Whether ticks can do anything (else the caller need not tick)."""
        return self.ack_timeout > 0 or self.keepalive > 0

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
        """A keepalive probe was posted (it counts as heard: one probe per interval)."""
        self.last_heard = now

    def check(self, now: float) -> Verdict:
        if self.ack_timeout and self.outstanding and now - self.since > self.ack_timeout:
            return Verdict.DEAD
        if self.keepalive and now - self.last_heard >= self.keepalive:
            return Verdict.PROBE
        if self.ack_timeout and self.tail and not self.outstanding \
                and now - self.last_post >= min(TAIL_PROBE_MAX, self.ack_timeout / 4):
            return Verdict.PROBE
        return Verdict.OK
