"""The Hello handshake on rxe: a peer speaking another version is refused with a reason."""

from __future__ import annotations

import struct
import threading
import time

import pytest
import pyverbs.enums as e

import usdp
from usdp import _cm
from usdp._setup import _dev_name
from usdp._verbs import Device, QPResources
from usdp._wire import MAGIC, RejectReason, error_from_reject


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (struct.pack(">4sBBHII", MAGIC, 2, 0, 32, 32768, 32768), RejectReason.VERSION),
        (struct.pack(">4sBBHII", MAGIC, 1, 0, 65535, 1 << 30, 16), RejectReason.BAD_PARAMS),
        (b"GET / HTTP/1.1\r\n", RejectReason.NOT_USDP),
    ],
)
def test_bad_hello_is_rejected_with_its_reason(host_a: str, port: int, hello: bytes,
                                               reason: RejectReason) -> None:
    lst = usdp.SdpSocket()
    lst.bind((host_a, port))
    lst.listen()
    lst.settimeout(10)  # the bad peer is refused, so accept() times out
    outcome: list[BaseException] = []

    def accept() -> None:
        try:
            lst.accept()
        except BaseException as exc:  # the bad peer is refused; accept times out
            outcome.append(exc)

    t = threading.Thread(target=accept)
    t.start()
    chan = _cm.Channel()
    cmid = _cm.new_id(chan)
    deadline = time.monotonic() + 30
    _cm.resolve(cmid, chan, (host_a, port), None, deadline)
    res = QPResources(Device.get(_dev_name(cmid)), recv_count=4, recv_size=4096,
                      send_count=4, send_size=4096)
    res.modify(cmid, e.IBV_QPS_INIT)
    cmid.connect(_cm.conn_param(res.qp_num, hello, accept=False))
    ev = chan.get(30)
    assert ev.type == _cm.EV.RDMA_CM_EVENT_REJECTED, ev.name
    err = error_from_reject(ev.private_data)
    assert isinstance(err, usdp.HandshakeError), err
    assert err.reason == reason
    assert err.errno == 71  # EPROTO
    t.join(40)
    assert outcome and isinstance(outcome[0], TimeoutError)
    res.close()
    cmid.close()
    chan.close()
    lst.close()
