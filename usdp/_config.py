"""Per-socket tunables, with the reason for each default, and the one reader of the
``USDP_*`` environment variables (:meth:`Options.from_env`, :func:`rules_path_from_env`).

The variables, all optional (unset or empty: the default):

====================== ====================================================================
``USDP_ACK_TIMEOUT``   ``Options.ack_timeout``, seconds (0 turns the watchdog off)
``USDP_KEEPALIVE``     ``Options.keepalive``, seconds of silence before a probe (0: off)
``USDP_ZCOPY_THRESHOLD`` ``Options.zcopy_threshold``, bytes (0: no zero-copy)
``USDP_RECV_BUFS``     ``Options.recv_bufs``, receive slots (4..4096)
``USDP_RECV_BUF_SIZE`` ``Options.recv_buf_size``, bytes per slot (64..16 MiB)
``USDP_SEND_BUFS``     ``Options.send_bufs``, send slots (2..4096)
``USDP_DEFER``         ``Options.defer``: 0/1, no/yes, false/true, off/on
``USDP_BUSY_POLL``     ``Options.busy_poll``, microseconds a blocking call may busy-poll (0: never)
``USDP_MR_BUDGET``     ``Options.mr_budget``, registered bytes for the process (0: default)
``USDP_CONFIG``        the rules file of ``usdp.patch()`` / ``python -m usdp.run``
====================== ====================================================================

A value that does not parse raises ``ValueError`` naming the variable and its value, e.g.
``USDP_ACK_TIMEOUT='5s': expected seconds as a number``. (The test bed and the benchmark,
in ``usdptools``, read their own ``USDP_HOST_*``/``USDP_RXE_DEV``; the library does not.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from usdp._wire import MAX_BUF_SIZE, MAX_RECV_BUFS, MIN_BUF_SIZE, MIN_RECV_BUFS


def _amount(raw: str, unit: str) -> float:
    """A finite number, 0 or more, or ValueError naming the ``unit`` expected."""
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected {unit} as a number (0 or more)")
    return value


def _seconds(raw: str) -> float:
    return _amount(raw, "seconds")


def _micros(raw: str) -> float:
    return _amount(raw, "microseconds") / 1e6


def _whole(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise ValueError(f"expected a whole number in {lo}..{hi}")
        return value

    return parse


_TRUE, _FALSE = ("1", "yes", "true", "on"), ("0", "no", "false", "off")


def _flag(raw: str) -> bool:
    word = raw.strip().lower()
    if word not in _TRUE + _FALSE:
        raise ValueError("expected 0 or 1 (or no/yes, false/true, off/on)")
    return word in _TRUE


#: variable -> (Options field, parser); the table in the module docstring, as code.
_OPTION_VARS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "USDP_ACK_TIMEOUT": ("ack_timeout", _seconds),
    "USDP_KEEPALIVE": ("keepalive", _seconds),
    "USDP_ZCOPY_THRESHOLD": ("zcopy_threshold", _whole(0, 1 << 30)),
    "USDP_RECV_BUFS": ("recv_bufs", _whole(MIN_RECV_BUFS, MAX_RECV_BUFS)),
    "USDP_RECV_BUF_SIZE": ("recv_buf_size", _whole(MIN_BUF_SIZE, MAX_BUF_SIZE)),
    "USDP_SEND_BUFS": ("send_bufs", _whole(2, MAX_RECV_BUFS)),
    "USDP_DEFER": ("defer", _flag),
    "USDP_BUSY_POLL": ("busy_poll", _micros),
    "USDP_MR_BUDGET": ("mr_budget", _whole(0, 1 << 62)),
}


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def rules_path_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``$USDP_CONFIG``, the rules file named by the environment, or None."""
    return _env(environ).get("USDP_CONFIG") or None


def _default_busy_poll() -> float:
    """200 us, or 0 on a single CPU: a spinning caller there only delays the peer, rxe's
    own kernel work included (two-host VMs have one vCPU each)."""
    return 0.0002 if (os.cpu_count() or 1) > 1 else 0.0


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
        recv_bufs: receive slots posted = credits granted to the peer, at most: the ring
            starts with 4 and doubles up to this with use when the peer offers GROW
            (docs/protocol.md section 5b), so an idle connection pins 256 KiB, not 1 MiB.
        recv_buf_size: bytes per receive slot, header included. 16 x 64 KiB (a 1 MiB
            window) was measured by ``experiments/sweep_buffers.py`` at 0.98 of the best shape
            tried (32 x 64 KiB, 2 MiB window) for 2/3 of its memory; 32 KiB slots reached
            0.69-0.90 and 8-16 KiB slots 0.27-0.63: per-frame Python cost dominates, so
            bigger frames win until the window stops mattering. See docs/protocol.md.
        send_bufs: registered send slots, at most; a send is copied into one and posted.
            None is registered at setup (frames of up to 256 bytes go inline); they are
            added, doubling, when a send finds none free while it has credits.
        defer: the seed's deferral: a CQ event that arrives while a user call owns the
            connection only sets a pending flag (``USDP_DEFER=0`` turns it off, to measure).
        signal_every: request a send completion every N sends (pyverbs polls cost per
            completion, so fewer completions is cheaper); always when the pool runs dry.
        linger: seconds a closed connection goes on delivering its queued bytes and EOF
            in the background before it is aborted (``close`` itself returns at once
            unless ``SO_LINGER`` is set; at interpreter exit usdp waits for them). Linux
            keeps an orphaned TCP socket about as long when its peer stops reading.
        busy_poll: the most (seconds) a blocking call busy-polls its CQs before it arms
            them and sleeps on the completion fds; the engine adapts below it (twice what
            recent waits took). ``SO_BUSY_POLL`` (microseconds) or ``USDP_BUSY_POLL``
            (microseconds) set it; 0 never spins. Busy-polling takes a core, and pyverbs' poll
            holds the GIL, so it stays short: 200 us (measured in the VM: 1 ms spins cost
            a 1 MiB stream 20-35 % against 0-200 us, when both ends share a process);
            0 on a single CPU.
        nodelay: ``TCP_NODELAY``: no auto-cork (small sends never wait for the completion
            of an earlier send to share its frame).
        handshake_timeout: bound on each step of connection setup when no socket timeout
            is set.
        mr_budget: bytes of connection rings the whole process may hold registered before
            new connections are refused (a listener answers ``Reject(NO_RESOURCES)``,
            ``connect`` raises ENOBUFS); 0 (the default) means 1 GiB,
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
    linger: float = 30.0
    handshake_timeout: float = 30.0
    busy_poll: float = field(default_factory=lambda: _default_busy_poll())
    nodelay: bool = False
    mr_budget: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Options:
        """The defaults, overridden by the ``USDP_*`` variables that are set (see the
        module docstring); ``environ`` defaults to ``os.environ``.

        Raises:
            ValueError: a value that does not parse, naming the variable, e.g.
                ``USDP_ACK_TIMEOUT='5s': expected seconds as a number (0 or more)``.
        """
        env = _env(environ)
        changes: dict[str, Any] = {}
        for var, (name, parse) in _OPTION_VARS.items():
            raw = env.get(var, "").strip()
            if not raw:
                continue
            try:
                changes[name] = parse(raw)
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r}: {exc}") from None
        return cls(**changes)

    def with_rcvbuf(self, nbytes: int) -> Options:
        return replace(self, recv_bufs=max(4, min(4096, nbytes // self.recv_buf_size)))

    def with_sndbuf(self, nbytes: int) -> Options:
        return replace(self, send_bufs=max(2, min(4096, nbytes // self.recv_buf_size)))
