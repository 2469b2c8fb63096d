"""``Options.from_env()``: the one reader of ``USDP_*``; bad values name the variable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from usdp._config import Options, rules_path_from_env

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_when_nothing_is_set() -> None:
    assert Options.from_env({}) == Options()
    assert Options.from_env({"USDP_ACK_TIMEOUT": "", "USDP_DEFER": "  "}) == Options()


def test_every_variable_sets_its_field() -> None:
    env = {"USDP_ACK_TIMEOUT": "2.5", "USDP_KEEPALIVE": "1", "USDP_ZCOPY_THRESHOLD": "4194304",
           "USDP_RECV_BUFS": "8", "USDP_RECV_BUF_SIZE": "8192", "USDP_SEND_BUFS": "4",
           "USDP_DEFER": "off"}
    o = Options.from_env(env)
    assert (o.ack_timeout, o.keepalive, o.zcopy_threshold) == (2.5, 1.0, 4 << 20)
    assert (o.recv_bufs, o.recv_buf_size, o.send_bufs, o.defer) == (8, 8192, 4, False)


@pytest.mark.parametrize(("word", "value"), [("1", True), ("yes", True), ("ON", True),
                                             ("true", True), ("0", False), ("No", False)])
def test_defer_words(word: str, value: bool) -> None:
    assert Options.from_env({"USDP_DEFER": word}).defer is value


@pytest.mark.parametrize(("var", "raw", "why"), [
    ("USDP_ACK_TIMEOUT", "5s", "expected seconds as a number"),
    ("USDP_ACK_TIMEOUT", "-1", "expected seconds as a number"),
    ("USDP_ACK_TIMEOUT", "nan", "expected seconds as a number"),
    ("USDP_KEEPALIVE", "inf", "expected seconds as a number"),
    ("USDP_RECV_BUFS", "3", "expected a whole number in 4..4096"),
    ("USDP_RECV_BUFS", "eight", "expected a whole number in 4..4096"),
    ("USDP_RECV_BUF_SIZE", "64K", "expected a whole number in 64..16777216"),
    ("USDP_SEND_BUFS", "1.5", "expected a whole number in 2..4096"),
    ("USDP_ZCOPY_THRESHOLD", "-4", "expected a whole number in 0.."),
    ("USDP_DEFER", "maybe", "expected 0 or 1"),
])
def test_bad_value_names_the_variable(var: str, raw: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        Options.from_env({var: raw})
    assert str(info.value).startswith(f"{var}={raw!r}: {why}"), str(info.value)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USDP_ACK_TIMEOUT", "7")
    assert Options.from_env().ack_timeout == 7.0
    monkeypatch.setenv("USDP_ACK_TIMEOUT", "5s")
    with pytest.raises(ValueError, match=re.escape("USDP_ACK_TIMEOUT='5s': expected seconds")):
        Options.from_env()


def test_rules_path() -> None:
    assert rules_path_from_env({}) is None
    assert rules_path_from_env({"USDP_CONFIG": ""}) is None
    assert rules_path_from_env({"USDP_CONFIG": "/etc/r.conf"}) == "/etc/r.conf"


def test_no_other_module_reads_usdp_variables() -> None:
    """The library reads USDP_* only in _config (usdptools may read its own)."""
    offenders = []
    for path in sorted((ROOT / "usdp").rglob("*.py")):
        if path.name == "_config.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(environ|getenv)\b.*USDP_|USDP_\w+.*\b(environ|getenv)", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_usdp_run_reports_a_bad_variable() -> None:
    p = subprocess.run([sys.executable, "-m", "usdp.run", "-m", "this"], cwd=ROOT, text=True,
                       capture_output=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                            "USDP_ACK_TIMEOUT": "5s"})
    assert p.returncode == 2
    assert "USDP_ACK_TIMEOUT='5s': expected seconds as a number" in p.stderr, p.stderr
