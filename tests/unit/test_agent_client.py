"""The test bed's agent channel survives a call that times out (issue 11, item 15: one
slow agent reply under load used to poison every later two-host test with "cannot read
from timed out object"). Runs host B's real agent server on loopback."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

agent = pytest.importorskip("usdptools.testbed.agent",
                            reason="the agent imports the test bed's rxe helpers")


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    srv = agent._Server(("127.0.0.1", 0), agent._Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[0], srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_call_after_a_timed_out_call_uses_a_fresh_connection(
        server: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent.AgentClient, "CALL_TIMEOUT", 0.5)
    client = agent.AgentClient(*server, connect_timeout=30)
    try:
        pid = client.spawn([sys.executable, "-c", "import time; time.sleep(5)"])
        with pytest.raises(TimeoutError):
            client.wait(pid, 60)  # the agent answers in 5 s: our call gives up first
        assert client.call(op="ping") == {"ok": True}  # not the late "wait" reply
        assert client.spawn([sys.executable, "-c", "pass"]) > 0
    finally:
        client.close()
