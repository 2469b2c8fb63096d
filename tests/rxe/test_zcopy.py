"""Zero-copy (SrcAvail -> RDMA read -> RdmaRdCompl) on a real rxe device."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from typing import Any

import pytest
import pyverbs.enums as e

import usdp
from tests.rxe.helpers import TIMEOUT, client, recv_exactly, server
from usdp import _verbs

ZOPTS = usdp.Options(zcopy_threshold=64 * 1024)


def sink_sha(conn: usdp.SdpSocket, out: dict[str, Any], bufsize: int = 4 << 20) -> None:
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    total = 0
    while n := conn.recv_into(buf):
        h.update(memoryview(buf)[:n])
        total += n
    out["sha"], out["n"], out["stats"] = h.hexdigest(), total, conn.stats()


@pytest.mark.parametrize("size", [64 * 1024, 1 << 20, 8 << 20, 64 << 20])
def test_zcopy_transfers_checksummed(host_a: str, port: int, size: int) -> None:
    data = random.Random(size).randbytes(size)
    got: dict[str, Any] = {}
    with server(host_a, port, lambda c: sink_sha(c, got), options=ZOPTS) as errors, \
            client(host_a, port, ZOPTS) as s:
        s.sendall(data)
        st = s.stats()
        assert _verbs.remote_access_mrs() == 0  # the rkey died with the transfer
    assert not errors, errors
    assert got["n"] == size and got["sha"] == hashlib.sha256(data).hexdigest()
    assert st["zcopy_sends"] >= 1 and st["zcopy_bytes_out"] == size
    assert got["stats"]["zcopy_reads"] >= 1


def test_mixed_bcopy_and_zcopy_keep_stream_order(host_a: str, port: int) -> None:
    rng = random.Random(7)
    pieces = [rng.randbytes(rng.choice([10, 5000, 70_000, 300_000, 2_000_000]))
              for _ in range(30)]
    data = b"".join(pieces)

    def odd_reader(conn: usdp.SdpSocket) -> None:
        # Small reads go through the bounce buffer, large ones straight into our buffer.
        out = bytearray()
        sizes = [7, 100_000, 1000, 3 << 20]
        i = 0
        while chunk := conn.recv(sizes[i % len(sizes)]):
            out += chunk
            i += 1
        got["data"] = bytes(out)
        got["stats"] = conn.stats()

    got: dict[str, Any] = {}
    with server(host_a, port, odd_reader, options=ZOPTS) as errors, \
            client(host_a, port, ZOPTS) as s:
        for p in pieces:
            s.sendall(p)
        zs = s.stats()["zcopy_sends"]
    assert not errors, errors
    assert got["data"] == data
    assert zs == sum(len(p) >= 64 * 1024 for p in pieces)


def test_receiver_that_never_reads_times_out_the_sender(host_a: str, port: int) -> None:
    release = threading.Event()

    def never_read(conn: usdp.SdpSocket) -> None:
        assert release.wait(TIMEOUT)
        with pytest.raises(ConnectionError):
            while conn.recv(1 << 20):
                pass

    with server(host_a, port, never_read, options=ZOPTS) as errors:
        s = client(host_a, port, ZOPTS)
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):
            s.sendall(os.urandom(1 << 20))
        assert _verbs.remote_access_mrs() == 0
        with pytest.raises(OSError):
            s.sendall(b"x")  # the connection was aborted: no half-sent stream goes on
        s.close()
        release.set()
    assert not errors, errors


def test_receiver_closing_with_a_pending_src_avail(host_a: str, port: int) -> None:
    def close_at_once(conn: usdp.SdpSocket) -> None:
        assert conn.recv(1) == b"h"  # then close with the SrcAvail unread

    with server(host_a, port, close_at_once, options=ZOPTS) as errors, \
            client(host_a, port, ZOPTS) as s:
        s.sendall(b"h")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            s.sendall(os.urandom(2 << 20))
        assert _verbs.remote_access_mrs() == 0
    assert not errors, errors


def test_recv_buffers_stay_the_callers(host_a: str, port: int) -> None:
    """Direct RDMA reads into a bytearray leave it resizable afterwards (no cached export)."""
    data = os.urandom(512 * 1024)

    def reader(conn: usdp.SdpSocket) -> None:
        buf = bytearray(len(data))
        got = 0
        while got < len(buf):
            got += conn.recv_into(memoryview(buf)[got:])
        assert conn.stats()["zcopy_reads"] >= 1
        assert buf == data
        buf.extend(b"resizable")  # raises BufferError if a registration still held it

    with server(host_a, port, reader, options=ZOPTS) as errors, \
            client(host_a, port, ZOPTS) as s:
        s.sendall(data)
    assert not errors, errors


def test_stale_and_out_of_range_reads_fail_with_remote_access_error(host_a: str,
                                                                    port: int) -> None:
    """A peer that reads outside what was advertised, or after the transfer, gets a
    remote access error, and our data is untouched."""
    data = os.urandom(256 * 1024)
    keep = bytes(data)
    outcome: dict[str, Any] = {}
    proceed = threading.Event()
    read_done = threading.Event()

    def hostile(conn: usdp.SdpSocket) -> None:
        ep = conn._ep
        assert ep is not None
        with ep.lock:
            ep.wait(lambda: ep.conn.head_is_remote, TIMEOUT, "SrcAvail")
            seg = ep.conn._segments[0]
            rkey, vaddr, length = seg.rkey, seg.vaddr, seg.length  # type: ignore[union-attr]
            outcome["remote_mrs_during"] = _verbs.remote_access_mrs()
        dest = bytearray(length + 8192)
        mr = _verbs.UserMR(ep.res.dev, memoryview(dest), e.IBV_ACCESS_LOCAL_WRITE)
        try:
            # The legitimate read, by the normal path.
            got = recv_exactly(conn, length)
            outcome["ok"] = got == keep
            proceed.wait(TIMEOUT)  # the sender's send has returned: the rkey is dead
            with ep.lock, pytest.raises(usdp.RemoteAccessError):
                ep.zc.rdma_read(mr.addr, length, mr.lkey, rkey, vaddr, TIMEOUT)
            outcome["latched"] = type(ep.conn.error).__name__
        finally:
            mr.close()
            # The sender closes only now: its disconnect would flush our read (a reset)
            # before the remote access error could come back.
            read_done.set()

    with server(host_a, port, hostile, options=ZOPTS) as errors:
        s = client(host_a, port, ZOPTS)
        s.sendall(data)
        assert _verbs.remote_access_mrs() == 0
        proceed.set()
        assert read_done.wait(TIMEOUT)
        s.close()
    assert not errors, errors
    assert outcome["remote_mrs_during"] == 1
    assert outcome["ok"]
    assert outcome["latched"] == "RemoteAccessError"
    assert data == keep


def test_out_of_range_read_fails(host_a: str, port: int) -> None:
    data = os.urandom(128 * 1024)
    outcome: dict[str, Any] = {}

    def beyond(conn: usdp.SdpSocket) -> None:
        ep = conn._ep
        assert ep is not None
        dest = bytearray(8192)
        mr = _verbs.UserMR(ep.res.dev, memoryview(dest), e.IBV_ACCESS_LOCAL_WRITE)
        try:
            with ep.lock:
                ep.wait(lambda: ep.conn.head_is_remote, TIMEOUT, "SrcAvail")
                seg = ep.conn._segments[0]
                end = seg.vaddr + seg.length  # type: ignore[union-attr]
                try:
                    ep.zc.rdma_read(mr.addr, 4096, mr.lkey, seg.rkey,  # type: ignore[union-attr]
                                 end, TIMEOUT)
                except usdp.RemoteAccessError:
                    outcome["refused"] = True
        finally:
            mr.close()

    with server(host_a, port, beyond, options=ZOPTS) as errors:
        s = client(host_a, port, ZOPTS)
        s.settimeout(TIMEOUT)
        with pytest.raises(OSError):
            s.sendall(data)  # the reader's connection failed: ours is reset
        assert _verbs.remote_access_mrs() == 0
        s.close()
    assert not errors, errors
    assert outcome.get("refused")
