"""Count what a pytest JUnit report ran, and fail when the rxe tests did not really run.

A run whose rxe tests were skipped or never collected must fail, not pass: a green run
that never touched a device would be a lie.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(path: Path) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in total:
            total[k] += int(s.get(k, 0))
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
        passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        failed = c["failures"] + c["errors"]
        print(f"{p.name}: {passed} passed, {failed} failed, {c['skipped']} skipped")
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
