"""Provenance and self-description: system_info.json in every run, qfleet --version,
`qfleet config --explain`, and a CLI that starts without torch."""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
import tomllib
import typing
from importlib import metadata
from pathlib import Path

import pytest
from _cli import REPO_ROOT, cli_env

import qfleet
from qfleet.cli import main
from qfleet.config import Config, from_dict, load_config, to_toml
from qfleet.config_sections import PYTHON_ONLY
from qfleet.sysinfo import write_system_info


def _git_head() -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_run_records_versions_machine_and_command(tiny_run: Path) -> None:
    info = json.loads((tiny_run / "system_info.json").read_text())
    assert info["qfleet"] == qfleet.__version__
    assert info["git"]["commit"] == _git_head() and isinstance(info["git"]["dirty"], bool)
    for package in ("torch", "gymnasium", "numpy", "ray"):
        assert info["packages"][package] == metadata.version(package), package
    assert info["python"] == platform.python_version() and info["cpu_count"] >= 1
    assert info["os"] == platform.platform() and isinstance(info["gpus"], list)
    assert info["argv"] == sys.argv  # the process that trained it: this pytest


def test_a_resume_keeps_the_earlier_sessions(tmp_path: Path) -> None:
    first = write_system_info(tmp_path)
    second = write_system_info(tmp_path)
    assert second["earlier"] == [first]
    assert json.loads((tmp_path / "system_info.json").read_text())["earlier"] == [first]


def test_version_names_the_package_and_the_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"qfleet {qfleet.__version__} (git {_git_head()[:12]}")
    assert f"Python {platform.python_version()}" in out


def test_config_explain_comments_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "cartpole-dqn", "--explain", "--set", "learner.lr=0.01"]) == 0
    text = capsys.readouterr().out
    assert from_dict(tomllib.loads(text)) == load_config("cartpole-dqn", ["learner.lr=0.01"])
    # Without its comments, it is the plain resolved TOML: every field commented, none lost.
    plain = to_toml(load_config("cartpole-dqn", ["learner.lr=0.01"])).splitlines()
    lines = text.splitlines()[1:]  # after "# resolved from ..."
    assert [ln for ln in lines if not ln.startswith("#")] == \
        [ln for ln in plain if not ln.startswith("#")]
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("# "), line
    assert "# learning rate of the optimizer (> 0.0)\nlr = 0.01" in text
    assert '(one of "inline", "processes", "ray")\nbackend = "inline"' in text


def test_every_config_field_has_help_text() -> None:
    missing = []
    for section in dataclasses.fields(Config):
        tp = typing.get_type_hints(Config)[section.name]
        inner = dataclasses.fields(tp) if dataclasses.is_dataclass(tp) else [section]
        missing += [f"{section.name}.{f.name}" for f in inner
                    if not f.metadata.get("help") and not f.metadata.get(PYTHON_ONLY)]
    assert not missing, missing


def test_help_answers_without_importing_torch() -> None:
    code = ("import sys, contextlib, io\nfrom qfleet.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['--help'])\n"
            "import qfleet\nqfleet.__all__\n"
            "print(sorted(m for m in ('torch', 'gymnasium', 'ray', 'wandb', 'mlflow') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True,
                          text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout
    assert {"load_policy", "Policy", "Callback", "train"} <= set(qfleet.__all__)
    assert qfleet.load_policy.__module__ == "qfleet.policy_io"
