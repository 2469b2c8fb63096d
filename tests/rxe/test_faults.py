"""Faults on two hosts (issue 6): netem on the link, a peer killed mid-stream, a storm of
connection attempts. Host B runs ``tests/rxe/peer_stream.py`` through the agent.

Sizes: the issue asks for 64 MiB each way at once. The bed is two TCG-emulated VMs with one
vCPU each on a shared 2-core machine, where usdp moves a few MB/s, so each stream here is
``NBYTES`` (32 MiB, ``USDP_FAULT_MIB=64`` for the issue's size) each way at once, which
keeps each case under ~15 s (clean ~5 s); the throughput printed next to the clean link's
is what to compare. 5 % loss moves an eighth of that (see ``SIZE``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import pytest

import usdp
from tests.rxe.conftest import HostB
from tests.rxe.helpers import connect_b
from tests.rxe.peer_stream import SMALL, drain, pump, stream_sha

pytestmark = pytest.mark.twohost

NBYTES = int(os.environ.get("USDP_FAULT_MIB", "32")) << 20  # 64 for the size
SEED_A, SEED_B = 11, 22
PEER = [".venv/bin/python", "tests/rxe/peer_stream.py"]
# Both ends get the same Options from the environment (e.g. USDP_ACK_TIMEOUT).
PEER_ENV = {k: v for k, v in os.environ.items() if k.startswith("USDP_ACK")}


def peer_result(host_b: HostB, pid: int, timeout: float) -> dict[str, Any]:
    res = host_b.wait(pid, timeout)
    assert res["rc"] == 0, res
    out: dict[str, Any] = json.loads(res["stdout"].strip().splitlines()[-1])
    return out


CONDITIONS: dict[str, dict[str, Any] | None] = {
    "clean": None,
    "loss_1pct": {"loss": 1},
    "loss_5pct": {"loss": 5},
    # netem's jitter reorders packets unless a rate is set; "in order" is what a jittery
    # path usually does to one flow, the other is reordering as well.
    "delay_20ms_jitter_5ms_in_order": {"delay": 20000, "jitter": 5000, "rate": "1gbit"},
    "delay_20ms_jitter_5ms": {"delay": 20000, "jitter": 5000},  # pyroute2: microseconds
    "reorder_25pct": {"delay": 2000, "prob_reorder": 25},  # reordering needs a delay
    "duplicate_5pct": {"duplicate": 5},
}
#: Bytes each way per case: 5 % loss runs at ~1/20 of the clean rate here (go-back-N
#: retransmits everything after each lost packet), so it moves less to stay ~15 s.
SIZE = {"loss_5pct": NBYTES // 8}

# Conditions where rxe 6.1's RC itself may give up, so a clean reset is an accepted outcome:
# - reordering (also what netem's jitter does without a rate) livelocks its go-back-N: each
#   out-of-order packet draws a sequence NAK and the requester resends from there, so
#   packets keep flowing (~2000/s in hw_counters) while no work request completes after
#   the first window. With retry_cnt 6 that ended in IBV_WC_RETRY_EXC_ERR within the first
#   MiB; with 7 (usdp's setting) usdp's watchdog (ack_timeout) resets the connection.
# - duplication: in some runs the responder fails a QP with IBV_WC_REM_INV_REQ_ERR (wc
#   status 9) on a duplicated packet, and in some it hands one SEND to the receive queue
#   twice, which usdp's message sequence numbers catch (ProtocolError: "CREDIT_UPDATE has
#   mseq 260, expected 261"); other runs deliver everything.
# - 5 % loss: most runs deliver (32 MiB each way in 96 s once, 4 MiB in 12-16 s), but in
#   one run of five both QPs stopped completing anything within the first MiB and the
#   watchdog reset the connection after ack_timeout (the same no-progress state as above).
# "Clean" means: both ends raise ConnectionResetError, or the ProtocolError of a detected
# repeat on one end and the reset that its ABORT causes on the other (no hang, no other
# error), and every byte handed out before that is the stream's true prefix (nothing lost
# or corrupted silently). Every other condition must deliver both streams in full.
MAY_RESET = {"loss_5pct", "delay_20ms_jitter_5ms", "reorder_25pct", "duplicate_5pct"}


def _clean_reset(side: dict[str, Any], seed_in: int) -> bool:
    """Both calls failed with a reset, and what arrived is an intact prefix."""
    errors = [side.get("send_error", ""), side.get("recv_error", "")]
    resets = all(str(e).startswith(("ConnectionReset", "BrokenPipe")) or "a repeat of the "
                 "previous message" in str(e) for e in errors if e)
    return resets and any(errors) and side["rx_sha"] == stream_sha(seed_in, side["received"])


@pytest.mark.parametrize("cond", list(CONDITIONS))
def test_streams_both_ways_under_netem(host_b: HostB, netem: Any, port: int,
                                       cond: str) -> None:
    spec = CONDITIONS[cond]
    nbytes = SIZE.get(cond, NBYTES)
    if spec is not None:
        netem(spec)
    pid = host_b.spawn([*PEER, "stream", host_b.addr, str(port), str(nbytes), str(SEED_B),
                        str(SEED_A)], env=PEER_ENV)
    s = connect_b(host_b, port)
    out: dict[str, object] = {}
    t0 = time.monotonic()
    sender = threading.Thread(target=pump, args=(s, SEED_A, nbytes, out))
    sender.start()
    drain(s, out)
    sender.join(120)
    secs = time.monotonic() - t0
    assert not sender.is_alive()
    s.close()
    peer = peer_result(host_b, pid, 120)
    mbps = 2 * nbytes / secs / 1e6
    print(f"\n{cond}: {nbytes >> 20} MiB each way in {secs:.1f} s = {mbps:.1f} MB/s "
          f"(both directions); peer {peer['secs']:.1f} s\n  us: {out}\n  peer: {peer}")
    delivered = "send_error" not in out and "recv_error" not in out \
        and "send_error" not in peer and "recv_error" not in peer
    if cond in MAY_RESET and not delivered:
        print(f"  {cond}: reset by the transport, cleanly (accepted for this condition)")
        assert _clean_reset(out, SEED_B), out
        assert _clean_reset(peer, SEED_A), peer
        return
    assert delivered, (out, peer)
    assert out["received"] == nbytes and out["rx_sha"] == stream_sha(SEED_B, nbytes)
    assert peer["received"] == nbytes and peer["rx_ok"], peer


class _EndlessBothWays:
    """Endless streams both ways on ``s`` (host B's peer runs ``stream ... 0``): a
    thread sends until its send fails; the constructor returns once 2 MiB came in."""

    def __init__(self, s: usdp.SdpSocket) -> None:
        self.s = s
        self.out: dict[str, Any] = {}
        self.send_done: list[float] = []  # when the sender's send failed
        self.sender = threading.Thread(target=self._send_forever)
        self.sender.start()
        self.buf = bytearray(1 << 20)
        got = 0
        while got < (2 << 20):  # the stream is flowing both ways
            n = s.recv_into(self.buf)
            assert n
            got += n

    def _send_forever(self) -> None:
        pump(self.s, SEED_A, 0, self.out)
        self.send_done.append(time.monotonic())

    def recv_until_error(self) -> BaseException | None:
        """Read on until the stream fails (the error) or ends (None)."""
        try:
            while self.s.recv_into(self.buf):
                pass
        except OSError as exc:
            return exc
        return None


def test_peer_killed_mid_stream(host_b: HostB, port: int) -> None:
    """SIGKILL of host B's process while both directions stream: our blocked recv and
    send fail with ConnectionResetError (the kernel's CM sends a DREQ for the dead
    process's ids), within a bound; never a hang, never a TimeoutError."""
    pid = host_b.spawn([*PEER, "stream", host_b.addr, str(port), "0", str(SEED_B), "0"])
    s = connect_b(host_b, port)
    flow = _EndlessBothWays(s)
    out = flow.out
    host_b.kill(pid)
    killed = time.monotonic()
    err = flow.recv_until_error()
    recv_detect = time.monotonic() - killed
    flow.sender.join(60)
    assert not flow.sender.is_alive()
    send_detect = flow.send_done[0] - killed
    s.close()
    res = host_b.wait(pid, 30)
    print(f"\nkill: recv saw {type(err).__name__ if err else 'EOF'} after "
          f"{recv_detect * 1000:.0f} ms ({err}); send saw {out.get('send_error')} after "
          f"{send_detect * 1000:.0f} ms; peer rc {res['rc']}")
    assert res["rc"] == -9
    assert isinstance(err, ConnectionResetError), repr(err)
    assert recv_detect < 10.0
    assert "ConnectionReset" in str(out.get("send_error")) or "BrokenPipe" in str(
        out.get("send_error")), out
    assert send_detect < 10.0


def test_link_down_mid_stream_fails_both_blocked_calls(host_b: HostB, port: int) -> None:
    """Host A's side of the link goes down while both directions stream, keepalive off:
    the watchdog (ack_timeout) fails the blocked send and recv with ConnectionResetError,
    not an endless block; with the link back, a new connection works."""
    from usdptools.testbed import rxe

    ack_timeout = 2.0
    pid = host_b.spawn([*PEER, "stream", host_b.addr, str(port), "0", str(SEED_B), "0"])
    s = connect_b(host_b, port, usdp.Options(ack_timeout=ack_timeout))
    s.settimeout(None)  # no socket timeout: only the watchdog can end the calls below
    flow = _EndlessBothWays(s)
    out = flow.out
    rxe.netem("eth0", {"loss": 100})  # everything A sends is lost, acks included
    down = time.monotonic()
    try:
        err = flow.recv_until_error()
        recv_detect = time.monotonic() - down
        flow.sender.join(60)
    finally:
        rxe.netem("eth0", None)  # before talking to B's agent, which uses this link
    assert not flow.sender.is_alive()
    send_detect = flow.send_done[0] - down
    s.close()
    host_b.kill(pid)
    host_b.wait(pid, 30)
    print(f"\nlink down mid-stream: recv saw {err!r} after {recv_detect:.1f} s; send saw "
          f"{out.get('send_error')} after {send_detect:.1f} s (ack_timeout {ack_timeout} s)")
    assert isinstance(err, ConnectionResetError) and "no acknowledgement" in str(err), err
    assert "ConnectionReset" in str(out.get("send_error")), out
    assert recv_detect < ack_timeout + 5 and send_detect < ack_timeout + 5
    # Back up: a new connection streams.
    pid = host_b.spawn([*PEER, "stream", host_b.addr, str(port + 1), str(1 << 20),
                        str(SEED_B), str(SEED_A)])
    with connect_b(host_b, port + 1) as s2:
        out2: dict[str, Any] = {}
        sender = threading.Thread(target=pump, args=(s2, SEED_A, 1 << 20, out2))
        sender.start()
        drain(s2, out2)
        sender.join(60)
        assert out2["received"] == 1 << 20 and out2["rx_sha"] == stream_sha(SEED_B, 1 << 20)
    assert peer_result(host_b, pid, 60)["rx_ok"]


def test_connection_storm_against_a_small_backlog(host_b: HostB, port: int) -> None:
    """200 connection attempts at once against one listener (backlog 5, which usdp
    raises to 128): each is served (echo) or refused cleanly, and the listener goes on."""
    attempts = 200
    pid = host_b.spawn([*PEER, "accept", host_b.addr, str(port), "5"])
    with connect_b(host_b, port, SMALL) as s:  # the listener is up
        s.sendall(b"first")
        assert s.recv(100) == b"first"
    outcomes: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(attempts, timeout=60)

    def attempt(i: int) -> None:
        msg = f"attempt {i}".encode()
        try:
            gate.wait()
            with usdp.SdpSocket(options=SMALL) as c:
                c.settimeout(60)
                c.connect((host_b.addr, port))
                c.sendall(msg)
                got = b""
                while len(got) < len(msg) and (chunk := c.recv(100)):
                    got += chunk
                outcome = "served" if got == msg else f"bad echo {got!r}"
        except ConnectionRefusedError:
            outcome = "refused"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        with lock:
            outcomes.append(outcome)

    t0 = time.monotonic()
    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    secs = time.monotonic() - t0
    assert all(not t.is_alive() for t in threads)
    served, refused = outcomes.count("served"), outcomes.count("refused")
    others = [o for o in outcomes if o not in ("served", "refused")]
    with connect_b(host_b, port, SMALL) as s:  # the listener still works
        s.sendall(b"quit")
        assert s.recv(100) == b"quit"
    peer = peer_result(host_b, pid, 120)
    print(f"\nstorm: {served} served, {refused} refused, {len(others)} other in {secs:.1f} s; "
          f"peer served {peer['served']} (incl. first and quit), errors {peer['errors'][:3]}")
    assert not others, others[:5]
    assert served + refused == attempts and served >= 1
    assert peer["served"] == served + 2 and not peer["errors"], peer
