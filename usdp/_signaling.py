"""Which sends raise events: the solicitation, signaling and auto-cork rules (sans-I/O).

Theory of operation
===================

The progress engine (``_engine``) lets the thread that owns a connection poll its CQs, so
under load nothing needs a completion event. Events are still needed by whoever sleeps, and
these rules decide which work requests can raise one. They are pure functions of a few
counters so that each can be unit-tested on its own (``tests/unit/test_signaling.py``).

Solicited receives (the peer's side)
------------------------------------
A receive CQ is armed *solicited-only*: a completion raises an event only if the sender set
``IBV_SEND_SOLICITED`` on that SEND (or if it failed). So the sender decides when a sleeping
receiver is woken. It solicits a frame that can unblock the peer:

* **control frames** (credit update, DISCONN, ABORT, KEEPALIVE, SrcAvail, RdmaRdCompl): each
  is rare, and each is something the peer may be sleeping for (credits, EOF, an error, a
  zero-copy transfer);
* **the last DATA frame of a burst**: the sender has nothing more queued, so a receiver that
  sleeps now would otherwise sleep on bytes that already arrived;
* **a DATA frame that leaves the sender short of credits** (``low_credits``): the sender is
  about to stop until the receiver reads and returns buffers;
* **every ``every``-th DATA frame of a long burst**: a receiver asleep mid-burst starts
  copying before the whole window has landed (pipelining), at 1/``every`` events per frame.

Everything else is unsolicited: a receiver that is polling (busy in ``recv``) picks it up
without an event, and a sleeping one is woken by the next solicited frame, which cannot be
more than ``every`` frames away.

Signaled sends (our side)
-------------------------
A send completion costs a Python object in pyverbs, so most sends are unsignaled and one
signaled completion frees every slot before it (sends complete in order). A send is
signaled when:

* it is a control frame that someone waits on (DISCONN, ABORT, KEEPALIVE, SrcAvail,
  RdmaRdCompl: the owner or the watchdog waits for those); a credit update is not;
* ``every`` sends have gone unsignaled;
* it uses the last free slot or the last usable credit (a sender about to wait must get a
  completion, and the ack watchdog needs a signaled send to watch);
* nothing signaled is in flight but earlier frames are: this completion is the one that
  will tell the auto-cork that the pipe has drained (see below).

Auto-cork
---------
While a signaled frame is in flight, a send smaller than a frame is appended to the open
(corked) send slot instead of taking a frame and a credit of its own; the completion of
that signaled frame means the pipe has drained, and the drain that sees it posts the cork.
That is Linux's TCP autocorking, with the send completion in the role of the TX completion.
A cork is only ever opened when such a completion is coming, so none is stranded.
``TCP_NODELAY`` turns it off. Corking for lack of credits (SDP's BCopy staging) is separate
and stays on: a credit update always comes once the peer reads.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SignalPolicy", "should_cork", "should_flush_cork", "signal_send", "solicit_data"]


@dataclass(frozen=True, slots=True)
class SignalPolicy:
    """The knobs of the rules above.

    Attributes:
        every: a signaled send, and a solicited DATA frame, at least every this many.
        low_credits: credits left after a DATA frame at or below which it is solicited.
    """

    every: int = 8
    low_credits: int = 2


def solicit_data(policy: SignalPolicy, *, last_of_burst: bool, credits_after: int,
                 unsolicited_run: int) -> bool:
    """Should this DATA frame carry ``IBV_SEND_SOLICITED``?

    Args:
        last_of_burst: the sender has nothing more to post after it right now.
        credits_after: the sender's credits once this frame is sent.
        unsolicited_run: DATA frames sent unsolicited since the last solicited one.
    """
    return (last_of_burst or credits_after <= policy.low_credits
            or unsolicited_run + 1 >= policy.every)


def signal_send(policy: SignalPolicy, *, control: bool, unsignaled_run: int,
                free_slots_after: int, credit_ok_after: bool, inflight_before: int,
                signaled_inflight: int) -> bool:
    """Should this send request a completion (``IBV_SEND_SIGNALED``)?

    Args:
        control: a control frame whose completion is awaited (always signaled).
        unsignaled_run: sends posted unsignaled since the last signaled one.
        free_slots_after: free send slots once this one is taken.
        credit_ok_after: whether another DATA frame could be sent after this one.
        inflight_before: sends in flight (posted, completion not yet seen) before it.
        signaled_inflight: signaled sends among those.
    """
    return (control or unsignaled_run + 1 >= policy.every or free_slots_after == 0
            or not credit_ok_after or (inflight_before > 0 and signaled_inflight == 0))


def should_cork(nbytes: int, max_payload: int, *, nodelay: bool,
                signaled_inflight: int) -> bool:
    """Should a send of ``nbytes`` (with credits to spare) go into the cork instead of a frame?

    Only sends smaller than a frame, only with corking on, and only while a signaled send
    is in flight: its completion is what flushes the cork.
    """
    return not nodelay and nbytes < max_payload and signaled_inflight > 0


def should_flush_cork(cork_len: int, max_payload: int, *, nodelay: bool,
                      signaled_inflight: int) -> bool:
    """Should a non-empty cork be posted now (credits permitting)?

    When it is full, when corking is off, or when no signaled send is in flight any more
    (the pipe drained: nothing would flush it later).
    """
    return cork_len > 0 and (cork_len >= max_payload or nodelay or signaled_inflight == 0)
