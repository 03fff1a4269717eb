"""Provenance: which code, libraries and machine produced a run (RUN_DIR/system_info.json).

Versions are read from the installed packages' metadata, so nothing heavy (Ray) is imported
to learn its version; the git commit is asked of the checkout qfleet is imported from.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import qfleet

PACKAGES = ("torch", "gymnasium", "numpy", "ray", "ale-py", "safetensors")
SOURCE_ROOT = Path(qfleet.__file__).resolve().parent.parent


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict[str, Any] | None:
    """The commit of the checkout qfleet runs from (and whether it had local changes), or
    None for an installed wheel."""
    if not (SOURCE_ROOT / ".git").exists() or not (SOURCE_ROOT / "pyproject.toml").is_file():
        return None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status), "path": str(SOURCE_ROOT)}


def _gpu() -> list[str]:
    torch = sys.modules.get("torch")  # asked only when training imported it already
    if torch is None or not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def system_info(argv: list[str] | None = None) -> dict[str, Any]:
    return {
        "qfleet": qfleet.__version__,
        "git": git_commit(),
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "os": platform.platform(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "gpus": _gpu(),
        "argv": list(sys.argv if argv is None else argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_system_info(run_dir: Path) -> dict[str, Any]:
    """Write RUN_DIR/system_info.json; a resumed run keeps the earlier sessions' records
    under "earlier" (a run may be continued on another machine)."""
    path = run_dir / "system_info.json"
    info = system_info()
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = None
    if isinstance(before, dict):
        info["earlier"] = [*before.pop("earlier", []), before]
    path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def version_line() -> str:
    """``qfleet --version``: the package version, and the commit of a checkout."""
    git = git_commit()
    where = f" (git {git['commit'][:12]}{', modified' if git['dirty'] else ''})" if git else ""
    return f"qfleet {qfleet.__version__}{where}, Python {platform.python_version()}"
