"""Host B's agent: lets tests on host A start processes and inject faults on host B.

A two-host bed runs the test suite on host A; host B runs this agent (``--peer``). It
listens on the test link only (198.18.0.2, never another interface) and speaks JSON lines:
one request object per line, one reply per line.

Requests: ``{"op": "ping"}``; ``{"op": "spawn", "argv": [...], "env": {...}}`` → ``{"pid"}``;
``{"op": "wait", "pid": N, "timeout": S}`` → ``{"rc", "stdout", "stderr"}`` (rc None if
still running); ``{"op": "kill", "pid": N, "sig": 9}``; ``{"op": "netem", "ifname": "eth0",
"spec": {...} | null}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import time
from typing import Any, ClassVar

from usdptools.testbed import rxe

AGENT_PORT = 7471


class AgentClient:
    """Host A's side of the agent protocol."""

    #: Every call is bounded: a lost link must not hang the suite.
    CALL_TIMEOUT: ClassVar[float] = 180.0

    def __init__(self, host: str, port: int = AGENT_PORT, connect_timeout: float = 180.0) -> None:
        self.host, self.port = host, port
        self._connect(connect_timeout)

    def _connect(self, connect_timeout: float) -> None:
        host, port = self.host, self.port
        deadline = time.monotonic() + connect_timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            try:
                self.sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError as e:  # host B may still be booting
                last = e
                time.sleep(0.5)  # retrying a connect to a booting VM: no event to wait on
        else:
            raise TimeoutError(f"host B's agent at {host}:{port} did not answer: {last}")
        self.sock.settimeout(self.CALL_TIMEOUT)
        self.file = self.sock.makefile("rwb")

    def call(self, **req: Any) -> dict[str, Any]:
        """One request, one reply. A call that times out or loses the connection raises,
        and the next call starts on a fresh connection: a socket file that timed out can
        never read again, and a late reply must not be taken for the next call's."""
        if self.file.closed:
            self._connect(60.0)
        try:
            self.file.write(json.dumps(req).encode() + b"\n")
            self.file.flush()
            line = self.file.readline()
        except OSError:
            self.close()
            raise
        if not line:
            self.close()
            raise ConnectionError("host B's agent closed the connection")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"agent: {reply['error']}")
        return reply

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        return int(self.call(op="spawn", argv=argv, env=env or {})["pid"])

    def wait(self, pid: int, timeout: float) -> dict[str, Any]:
        return self.call(op="wait", pid=pid, timeout=timeout)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        self.call(op="kill", pid=pid, sig=int(sig))

    def netem(self, spec: dict[str, Any] | None, ifname: str = "eth0") -> None:
        self.call(op="netem", ifname=ifname, spec=spec)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.sock.close()


class _Handler(socketserver.StreamRequestHandler):
    procs: ClassVar[dict[int, subprocess.Popen[bytes]]] = {}

    def handle(self) -> None:
        for line in self.rfile:
            try:
                reply = self._dispatch(json.loads(line))
            except Exception as e:  # report every failure to the caller, keep serving
                reply = {"error": f"{type(e).__name__}: {e}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()

    def _dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "spawn":
            env = {**os.environ, **req.get("env", {})}
            p = subprocess.Popen(req["argv"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            self.procs[p.pid] = p
            return {"pid": p.pid}
        if op == "wait":
            p = self.procs[req["pid"]]
            try:
                out, err = p.communicate(timeout=req.get("timeout"))
            except subprocess.TimeoutExpired:
                return {"rc": None, "stdout": "", "stderr": ""}
            del self.procs[req["pid"]]
            return {"rc": p.returncode, "stdout": out.decode(errors="replace"),
                    "stderr": err.decode(errors="replace")}
        if op == "kill":
            self.procs[req["pid"]].send_signal(req.get("sig", signal.SIGKILL))
            return {"ok": True}
        if op == "netem":
            rxe.netem(req.get("ifname", "eth0"), req.get("spec"))
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> int:
    host = os.environ.get("USDP_HOST_B", rxe.HOST_B_ADDR)
    with _Server((host, AGENT_PORT), _Handler) as srv:
        print(f"agent listening on {host}:{AGENT_PORT}", file=sys.stderr, flush=True)
        srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
