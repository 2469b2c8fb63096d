"""The readiness fd: a real fd whose poll state follows a usdp socket (``fileno()``).

select, selectors and asyncio need an fd. A connected usdp socket has none of its own that
means "data to read" (the CQ fds fire only when armed, and mean "a completion", not "bytes
for you"), so the endpoint keeps one end of a Unix socketpair in the state its socket is in.
"""

from __future__ import annotations

import socket


class Readiness:
    """A real fd whose poll state follows the socket, for select/selectors/asyncio.

    One end of a Unix socketpair. *Readable* is made by writing a byte from the other end
    and cleared by reading it back. *Writable* is cleared by filling our send buffer (a
    stream socketpair stops being writable when the peer's queue holds our sndbuf's worth)
    and restored by draining the other end. Only state changes cost system calls.
    """

    def __init__(self) -> None:
        self.ours, self.other = socket.socketpair()
        for s in (self.ours, self.other):
            s.setblocking(False)
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # kernel minimum
        self.readable = False
        self.writable = True

    def fileno(self) -> int:
        return self.ours.fileno()

    def set(self, readable: bool, writable: bool) -> None:
        if readable != self.readable:
            if readable:
                self.other.send(b"r")
            else:
                _drain_socket(self.ours)
            self.readable = readable
        if writable != self.writable:
            if writable:
                _drain_socket(self.other)
            else:
                try:
                    while True:
                        self.ours.send(b"\0" * 4096)
                except BlockingIOError:
                    pass
            self.writable = writable

    def close(self) -> None:
        self.ours.close()
        self.other.close()


def _drain_socket(s: socket.socket) -> None:
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        pass
