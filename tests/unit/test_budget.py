"""The registered-memory budget (usdp._budget): pure accounting."""

from __future__ import annotations

import errno
import resource

import pytest

from usdp._budget import DEFAULT_BUDGET, Budget, default_budget
from usdp._errors import UsdpError


def test_reserve_refuses_beyond_the_limit_and_release_gives_back() -> None:
    b = Budget()
    b.reserve(600, 1000, "conn 1")
    with pytest.raises(UsdpError) as info:
        b.reserve(500, 1000, "conn 2 to 1.2.3.4:5")
    assert info.value.errno == errno.ENOBUFS
    assert "conn 2 to 1.2.3.4:5" in str(info.value) and "budget" in str(info.value)
    assert b.used == 600  # a refused reservation takes nothing
    b.release(600)
    b.reserve(1000, 1000, "conn 3")
    assert b.used == 1000
    b.release(5000)  # never below zero
    assert b.used == 0
    with pytest.raises(ValueError):
        b.reserve(-1, 1000, "bad")


def test_reset_after_fork_forgets_the_parent() -> None:
    b = Budget()
    b.reserve(10, 100, "x")
    b.reset()
    assert b.used == 0


def test_default_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USDP_MR_BUDGET", raising=False)
    assert default_budget(resource.RLIM_INFINITY, privileged=False) == DEFAULT_BUDGET
    assert default_budget(8 << 20, privileged=False) == 6 << 20  # 3/4 of RLIMIT_MEMLOCK
    assert default_budget(8 << 20, privileged=True) == DEFAULT_BUDGET  # root is not bound
    assert default_budget(1 << 40, privileged=False) == DEFAULT_BUDGET
    from usdp._config import Options

    assert Options.from_env({"USDP_MR_BUDGET": "12345"}).mr_budget == 12345
