"""The README's examples run as written: every fenced block of "Callbacks", "Use a trained
policy" and "Your own environment", in order, in one scratch folder (bash blocks in bash with
the installed `qfleet` command, python blocks in a fresh interpreter, TOML blocks validated
as configs). A block under a "not run by the README test" comment is skipped; only the Hub
upload is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from _cli import REPO_ROOT, cli_env

SECTIONS = ("Callbacks", "Use a trained policy", "Your own environment")
SKIP_MARK = "<!-- not run by the README test"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


@dataclass
class Block:
    section: str
    lang: str
    code: str
    skipped: bool


def readme_blocks() -> list[Block]:
    text = (REPO_ROOT / "README.md").read_text()
    blocks: list[Block] = []
    for part in re.split(r"^#{2,3} ", text, flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        if title not in SECTIONS:
            continue
        for match in FENCE.finditer(part):
            before = part[:match.start()].rstrip().splitlines()[-1:]
            blocks.append(Block(title, match.group(1), match.group(2),
                                bool(before) and before[0].startswith(SKIP_MARK)))
    return blocks


def test_the_sections_hold_what_the_readme_test_runs() -> None:
    blocks = readme_blocks()
    assert {b.section for b in blocks} == set(SECTIONS)
    assert [b.code for b in blocks if b.skipped] == \
        ["qfleet push runs/cartpole --repo your-name/cartpole-dqn               "
         "# prepare and upload\n"]
    for block in blocks:  # cheap checks for the fast lane: each block at least parses
        if block.lang == "python":
            compile(block.code, f"README {block.section}", "exec")
        elif block.lang == "toml":
            tomllib.loads(block.code)
        else:
            assert block.lang == "bash", block.lang


def _env() -> dict[str, str]:
    env = cli_env() | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the qfleet command
    return env


def _run(block: Block, cwd: Path) -> subprocess.CompletedProcess[str]:
    first = block.code.splitlines()[0]
    if block.lang == "python" and first.startswith("# file: "):
        (cwd / first.removeprefix("# file: ").strip()).write_text(block.code)
        return subprocess.CompletedProcess([], 0, "", "")
    if block.lang == "python":
        args = [sys.executable, "-c", block.code]
    elif block.lang == "toml":  # a config fragment: it must validate (its env imports)
        args = [sys.executable, "-c", "import sys, tomllib\nfrom qfleet.config import from_dict"
                "\nfrom_dict(tomllib.loads(sys.stdin.read()))"]
    else:
        args = ["bash", "-e", "-c", block.code]
    return subprocess.run(args, cwd=cwd, env=_env(), input=block.code, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path: Path) -> None:
    for block in readme_blocks():
        if not block.skipped:
            proc = _run(block, tmp_path)
            assert proc.returncode == 0, (block.section, block.code, proc.stdout, proc.stderr)
    assert (tmp_path / "runs" / "cartpole" / "export" / "policy.onnx").is_file()
    assert (tmp_path / "cartpole.pt").is_file()
    assert (tmp_path / "runs" / "cartpole" / "hub" / "README.md").is_file()
    assert (tmp_path / "runs" / "corridor-fn" / "result.json").is_file()
