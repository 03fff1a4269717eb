"""Mutation score per core module from mutmut's results (mutants/**/*.meta), one line each.

Killed = a test failed (or the mutant timed out: an endless loop is caught). The score is
killed / (killed + survived + reached by no selected test): a mutant no test reaches
counts as not killed. ``--list`` also names every survivor and unreached mutant, for
review: each one is either killed by a new test or argued equivalent.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

MODULES = ("qfleet.losses", "qfleet.policies", "qfleet.replay", "qfleet.roles")
KILLED = {1, 3, 37, -11, -9}  # a test failed, the type check failed, it crashed
TIMEOUT = {36, -24, 24, 152, 255}  # killed too, unless the machine was just busy: rerun them
NO_TESTS = {5, 33}
SURVIVED = {0}


def results(root: Path) -> dict[str, int]:
    codes: dict[str, int] = {}
    for meta in sorted(root.glob("**/*.py.meta")):
        codes |= json.loads(meta.read_text())["exit_code_by_key"]
    return codes


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 and not argv[1].startswith("-") else Path("mutants")
    codes = results(root)
    if not codes:
        print(f"no mutmut results under {root}/ (run `make mutants` first)")
        return 1
    for module in MODULES:
        mine = {k: v for k, v in codes.items() if k.startswith(module + ".")}
        count = Counter("killed" if v in KILLED else "timeout" if v in TIMEOUT
                        else "no tests" if v in NO_TESTS else "survived" if v in SURVIVED
                        else "not run" for v in mine.values())
        killed = count["killed"] + count["timeout"]
        judged = killed + count["survived"] + count["no tests"]
        score = 100.0 * killed / judged if judged else 0.0
        print(f"{module:16} {score:5.1f}% killed  ({count['killed']} killed, "
              f"{count['timeout']} timed out, {count['survived']} survived, "
              f"{count['no tests']} reached by no test, {count['not run']} not run)")
        if "--list" in argv:
            for key in sorted(k for k, v in mine.items() if v in SURVIVED | NO_TESTS):
                print(f"    {'survived' if mine[key] in SURVIVED else 'no test '}: {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
