"""Per-socket tunables, with the reason for each default."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


def _env_bool(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() not in ("0", "no", "false", "off", "")


#: Probe interval that ``setsockopt(SOL_SOCKET, SO_KEEPALIVE, 1)`` turns on (seconds).
KEEPALIVE_DEFAULT = 2.0


@dataclass(frozen=True)
class Options:
    """Tunables of one socket; ``SO_RCVBUF``/``SO_SNDBUF`` map onto the rings.

    Attributes:
        keepalive: seconds of silence after which a KEEPALIVE frame probes the peer;
            a dead peer or link then fails the connection (ECONNRESET) once the probe
            has gone ``ack_timeout`` unacknowledged. 0 (the default, as TCP's) turns it
            off; ``SO_KEEPALIVE`` sets it to ``KEEPALIVE_DEFAULT``.
        ack_timeout: seconds a send may wait for the peer's transport acknowledgement
            before the peer is declared dead (ECONNRESET); TCP_USER_TIMEOUT in
            milliseconds sets it, 0 turns it off. The QP itself retries forever (rxe
            would otherwise reset connections on 5 % loss or reordering, see
            ``_verbs.RETRY_CNT``). Only the peer's HCA/kernel must answer, not its
            program, so a slow reader never trips it; 5 s is ~75 retransmission timeouts.
        zcopy_threshold: sends of at least this many bytes go zero-copy (SrcAvail + the
            peer's RDMA read); 0 (the default) turns it off. Measured by scripts/bench,
            zero-copy beat BCopy only at 4 MiB (1.2-1.7x, one and two hosts) and lost at
            64 KiB-1 MiB, so 4 MiB is the value to use for bulk transfers. It stays off by
            default because a zero-copy send that times out must abort the connection
            (there is no SrcAvailCancel): a drop-in program's ``settimeout`` would turn
            into connection aborts. See docs/protocol.md section 10.
        recv_bufs: receive slots posted = credits granted to the peer.
        recv_buf_size: bytes per receive slot, header included. 16 x 64 KiB (a 1 MiB
            window) was measured by ``scripts/sweep_buffers.py`` at 0.98 of the best shape
            tried (32 x 64 KiB, 2 MiB window) for 2/3 of its memory; 32 KiB slots reached
            0.69-0.90 and 8-16 KiB slots 0.27-0.63: per-frame Python cost dominates, so
            bigger frames win until the window stops mattering. See docs/protocol.md.
        send_bufs: registered send slots; a send is copied into one and posted.
        defer: the seed's deferral: a CQ event that arrives while a user call owns the
            connection only sets a pending flag (``USDP_DEFER=0`` turns it off, to measure).
        signal_every: request a send completion every N sends (pyverbs polls cost per
            completion, so fewer completions is cheaper); always when the pool runs dry.
        linger: seconds ``close`` waits for queued data to reach the peer.
        handshake_timeout: bound on each step of connection setup when no socket timeout
            is set.
        mr_budget: bytes of connection rings the whole process may hold registered before
            new connections are refused (a listener answers ``Reject(NO_RESOURCES)``,
            ``connect`` raises ENOBUFS); 0 (the default) means ``USDP_MR_BUDGET`` or 1 GiB,
            less under a finite RLIMIT_MEMLOCK (see ``usdp._budget``). A peer's Hello cannot
            make us pin more than our own rings: send slots follow the negotiated frame size.
    """

    zcopy_threshold: int = 0
    keepalive: float = 0.0
    ack_timeout: float = 5.0
    recv_bufs: int = 16
    recv_buf_size: int = 64 * 1024
    send_bufs: int = 16
    defer: bool = True
    signal_every: int = 8
    linger: float = 10.0
    handshake_timeout: float = 30.0
    mr_budget: int = 0

    @classmethod
    def from_env(cls) -> Options:
        ack = os.environ.get("USDP_ACK_TIMEOUT")
        return cls(defer=_env_bool("USDP_DEFER", True),
                   ack_timeout=float(ack) if ack else cls.ack_timeout)

    def with_rcvbuf(self, nbytes: int) -> Options:
        return replace(self, recv_bufs=max(4, min(4096, nbytes // self.recv_buf_size)))

    def with_sndbuf(self, nbytes: int) -> Options:
        return replace(self, send_bufs=max(2, min(4096, nbytes // self.recv_buf_size)))
