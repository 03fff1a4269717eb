"""The environment a test gives a real ``qfleet`` subprocess."""

from __future__ import annotations

import os
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def cli_env() -> dict[str, str]:
    """This environment, with the repo and tests/ importable (``envs_for_tests:Class``)
    and rich writing plain, wide lines."""
    env = dict(os.environ)
    extra = os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])
    env["PYTHONPATH"] = extra + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200", TERM="dumb")
    return env


def running(pid: int | str) -> bool:
    """Whether process ``pid`` still runs. A zombie has exited: reaping it is its new
    parent's business (init's, or none in a container whose first process reaps nothing)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False
