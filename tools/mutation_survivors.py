"""Every surviving mutant of the core, explained or not: `make mutants` runs this last.

A survivor (no test failed) is either a gap, to close with a test, or a change that cannot
alter what the code computes, to argue once in ``mutation_equivalents.toml``: a rule names
the mutated function (``where``, a regex on mutmut's key), the changed line before and
after (``before``/``after``, regexes on the diff's ``-``/``+`` lines) and ``why``. This
prints how many survivors each rule explains, then every unexplained one with its diff.
Exit status 1 while any is unexplained, so the list cannot silently grow.

    python tools/mutation_survivors.py [mutants-dir]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mutation_scores import MODULES, NO_TESTS, SURVIVED, results

RULES = Path(__file__).with_name("mutation_equivalents.toml")


@dataclass(frozen=True)
class Rule:
    why: str
    where: str = ""
    before: str = ""
    after: str = ""

    def explains(self, key: str, removed: list[str], added: list[str]) -> bool:
        return bool(re.search(self.where, key)
                    and any(re.search(self.before, line) for line in removed or [""])
                    and any(re.search(self.after, line) for line in added or [""]))


def diff(key: str) -> tuple[list[str], list[str], str]:
    text = subprocess.run([sys.executable, "-m", "mutmut", "show", key], capture_output=True,
                          text=True, check=False).stdout
    lines = text.splitlines()
    removed = [x[1:] for x in lines if x.startswith("-") and not x.startswith("---")]
    added = [x[1:] for x in lines if x.startswith("+") and not x.startswith("+++")]
    return removed, added, text


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path("mutants")
    rules = [Rule(**r) for r in tomllib.loads(RULES.read_text())["rule"]]
    keys = sorted(k for k, v in results(root).items()
                  if k.startswith(MODULES) and v in SURVIVED | NO_TESTS)
    used: Counter[str] = Counter()
    unexplained: list[str] = []
    for key in keys:
        removed, added, text = diff(key)
        rule = next((r for r in rules if r.explains(key, removed, added)), None)
        if rule is None:
            unexplained.append(text.strip())
        else:
            used[rule.why] += 1
    print(f"{len(keys)} surviving mutants, {len(keys) - len(unexplained)} argued equivalent:")
    for why, count in used.most_common():
        print(f"  {count:4d}  {why}")
    for rule in rules:
        if rule.why not in used:
            print(f"  rule no longer needed: {rule.why}")
    if unexplained:
        print(f"\n{len(unexplained)} unexplained (kill each with a test, or argue it):\n")
        print("\n\n".join(unexplained))
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
