"""Count what a pytest JUnit report ran, and fail when the rxe tests did not really run.

A run whose rxe tests were skipped or never collected must fail, not pass: a green run
that never touched a device would be a lie.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(path: Path) -> dict[str, int]:
    """Totals of a report. A strict xfail is reported by pytest as a <skipped> element of
    type ``pytest.xfail``, but the test did run (and failed as declared): it counts as
    ``xfailed``, not as a skip."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "xfailed": 0}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            total[k] += int(s.get(k, 0))
    xfailed = sum(1 for sk in root.iter("skipped") if sk.get("type") == "pytest.xfail")
    total["xfailed"] = xfailed
    total["skipped"] -= xfailed
    return total


def main(argv: list[str]) -> int:
    ok = True
    grand = {"passed": 0, "failed": 0, "skipped": 0}
    for name in argv:
        p = Path(name)
        if not p.exists():
            print(f"{name}: no report (the run did not get as far as pytest)")
            ok = False
            continue
        c = counts(p)
        passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"] - c["xfailed"]
        failed = c["failures"] + c["errors"]
        print(f"{p.name}: {passed} passed, {failed} failed, {c['skipped']} skipped, "
              f"{c['xfailed']} xfailed (declared known failures)")
        grand["passed"] += passed
        grand["failed"] += failed
        grand["skipped"] += c["skipped"]
        if passed == 0:
            print(f"{p.name}: no rxe test ran: failing the run")
            ok = False
        if c["skipped"]:
            print(f"{p.name}: rxe tests were skipped: failing the run")
            ok = False
        if failed:
            ok = False
    print(f"rxe: {grand['passed']} passed, {grand['failed']} failed, "
          f"{grand['skipped']} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
