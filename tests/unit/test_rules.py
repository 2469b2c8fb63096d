"""Rules (libsdp.conf style): parsing, first-match-wins, errors that name file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from usdp._rules import DEFAULT_RDMA_TIMEOUT, Rules, RulesError, load, parse

CONF = """\
# a comment line, then rules
use tcp    client  *          127.0.0.0/8:*      # loopback never has RDMA
use sdp    server  *          198.18.0.0/15:7000-7099
use both   client  curl*      *:8080
use sdp    *       myprog.py  [2001:2::/64]:*
use tcp    server  *          *
default sdp
rdma-timeout 2.5
"""


@pytest.fixture
def rules() -> Rules:
    return parse(CONF, "test.conf")


@pytest.mark.parametrize(("role", "program", "host", "port", "use", "line"), [
    ("client", "x.py", "127.0.0.1", 80, "tcp", 2),
    ("client", "x.py", "127.9.9.9", 7000, "tcp", 2),
    ("server", "x.py", "198.18.0.1", 7000, "sdp", 3),
    ("server", "x.py", "198.19.255.1", 7099, "sdp", 3),
    ("server", "x.py", "198.18.0.1", 7100, "tcp", 6),  # port outside the range
    ("client", "curl-like", "10.0.0.1", 8080, "both", 4),
    ("client", "wget", "10.0.0.1", 8080, "sdp", 0),  # no rule: the default
    ("client", "myprog.py", "2001:2::2", 1, "sdp", 5),
    ("server", "myprog.py", "2001:2::1", 9, "sdp", 5),
    ("server", "myprog.py", "", 9, "tcp", 6),  # wildcard bind is 0.0.0.0: not in 2001:2::/64
    ("client", "x.py", "::ffff:127.0.0.1", 1, "tcp", 2),  # v4-mapped matches a v4 network
    ("client", "x.py", "some.host.name", 1, "sdp", 0),  # unresolved names match only "*"
])
def test_first_match_wins(rules: Rules, role: str, program: str, host: str, port: int,
                          use: str, line: int) -> None:
    d = rules.decide(role, program, host, port)  # type: ignore[arg-type]
    assert d.use == use
    assert d.where == (f"test.conf:{line}" if line else "test.conf: default")


def test_settings(rules: Rules) -> None:
    assert rules.default == "sdp"
    assert rules.rdma_timeout == 2.5
    assert len(rules.rules) == 5


def test_empty_text_gives_the_builtin_default() -> None:
    r = parse("\n# nothing\n\n")
    assert r.rules == [] and r.default == "both" and r.rdma_timeout == DEFAULT_RDMA_TIMEOUT
    assert r.decide("server", "p", "1.2.3.4", 5).use == "both"


@pytest.mark.parametrize(("text", "lineno", "why"), [
    ("use rdma client * *", 1, "transport must be one of"),
    ("\n\nuse sdp client *", 3, "expected: use"),
    ("use sdp nobody * *", 1, "role must be"),
    ("use sdp client * 1.2.3.4", 1, "ADDRESS[/PREFIX]:PORT"),
    ("use sdp client * 1.2.3.400:*", 1, "does not appear to be an IPv4 or IPv6"),
    ("use sdp client * 1.2.3.4:70000", 1, "outside 0-65535"),
    ("use sdp client * 1.2.3.4:9-1", 1, "reversed"),
    ("use sdp client * 1.2.3.4:x", 1, "invalid literal"),
    ("use sdp client * 2001:2::1:*", 1, "in brackets"),
    ("use sdp client * [2001:2::1]", 1, "[ADDRESS[/PREFIX]]:PORT"),
    ("# ok\nusee sdp client * *", 2, "unknown keyword 'usee'"),
    ("default fast", 1, "transport must be one of"),
    ("rdma-timeout -1", 1, "positive"),
])
def test_bad_line_names_file_and_line(text: str, lineno: int, why: str) -> None:
    with pytest.raises(RulesError) as info:
        parse(text, "bad.conf")
    msg = str(info.value)
    assert msg.startswith(f"bad.conf:{lineno}: "), msg
    assert why in msg, msg
    assert info.value.lineno == lineno


def test_load_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("USDP_CONFIG", raising=False)
    assert load().source == "<built-in>"  # no per-user file: built-in, no error
    user = tmp_path / "xdg" / "usdp" / "rules.conf"
    user.parent.mkdir(parents=True)
    user.write_text("default tcp\n")
    assert load().default == "tcp"
    env = tmp_path / "env.conf"
    env.write_text("default sdp\n")
    monkeypatch.setenv("USDP_CONFIG", str(env))
    assert load().default == "sdp"
    explicit = tmp_path / "explicit.conf"
    explicit.write_text("default both\nrdma-timeout 1\n")
    assert load(explicit).rdma_timeout == 1.0
    with pytest.raises(RulesError, match=r"missing\.conf: cannot read"):
        load(tmp_path / "missing.conf")


def test_error_from_a_file_names_its_path(tmp_path: Path) -> None:
    f = tmp_path / "rules.conf"
    f.write_text("use sdp client * *\nuse sdp client *:*\n")
    with pytest.raises(RulesError, match=rf"^{f}:2: expected: use"):
        load(f)
