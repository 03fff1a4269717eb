"""The ``qfleet`` command, run for real as ``python -m qfleet`` in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qfleet import checkpoint
from qfleet.algos.program import Schedule
from qfleet.config import from_dict, load_config

RESULT_KEYS = {"eval_return_mean", "eval_return_std", "eval_episodes", "env_steps", "updates",
               "wall_s", "env_steps_per_s"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def updates_owed(cfg_path: Path, env_steps: int) -> int:
    cfg = load_config(cfg_path)
    return Schedule(cfg.learner.batch_size, cfg.learner.learning_starts, cfg.learner.train_every,
                    cfg.learner.updates_per_round, cfg.actors.chunk_size).updates_owed(env_steps)


def assert_checkpoint_files(ckpt: Path) -> None:
    """safetensors + JSON only: nothing a loader would have to unpickle."""
    names = sorted(p.name for p in ckpt.iterdir())
    assert "state.json" in names and "tensors.safetensors" in names, names
    assert all(n.endswith((".safetensors", ".json")) for n in names), names


@pytest.fixture(scope="module")
def trained(run_cli: Callable[..., subprocess.CompletedProcess[str]], fast_sets: list[str],
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real 2000-step `qfleet train`, shared by the read-only tests below."""
    run_dir = tmp_path_factory.mktemp("cli-train") / "run"
    proc = run_cli("train", "cartpole-dqn", "--run-dir", str(run_dir),
                   sets=[*fast_sets, "checkpoint.replay=true"])
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc.stdout


def test_train_writes_a_complete_run_dir(trained: tuple[Path, str],
                                         fast_sets: list[str]) -> None:
    run_dir, stdout = trained
    assert load_config(run_dir / "config.toml") == load_config(
        "cartpole-dqn", [*fast_sets, "checkpoint.replay=true"])

    records = read_jsonl(run_dir / "metrics.jsonl")
    assert {r["event"] for r in records} == {"train", "eval"}
    for r in records:
        assert isinstance(r["env_steps"], int) and isinstance(r["wall_s"], (int, float)), r
    steps = [r["env_steps"] for r in records]
    assert steps == sorted(steps)

    result = json.loads((run_dir / "result.json").read_text())
    assert set(result) >= RESULT_KEYS
    assert result["eval_episodes"] == 3
    assert 2000 <= result["env_steps"] < 2000 + 64  # stops within one chunk of the budget
    assert result["env_steps"] == steps[-1]
    assert result["updates"] == updates_owed(run_dir / "config.toml", result["env_steps"]) > 0
    assert result["wall_s"] > 0
    assert result["env_steps_per_s"] == pytest.approx(result["env_steps"] / result["wall_s"])
    last_eval = [r for r in records if r["event"] == "eval"][-1]
    assert last_eval["eval_return_mean"] == result["eval_return_mean"]

    ckpt = checkpoint.find(run_dir)
    assert ckpt.parent == run_dir / "checkpoints"
    assert_checkpoint_files(ckpt)
    _, meta, _ = checkpoint.load(ckpt)
    assert meta["env_steps"] == result["env_steps"] and meta["updates"] == result["updates"]
    assert f"{result['eval_return_mean']:.1f}" in stdout and str(run_dir) in stdout


def test_presets_lists_names_and_descriptions(run_cli: Callable[..., Any]) -> None:
    proc = run_cli("presets")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("cartpole-dqn"))
    assert load_config("cartpole-dqn").description in line


def test_config_prints_resolved_toml(run_cli: Callable[..., Any]) -> None:
    proc = run_cli("config", "cartpole-dqn", "--set", "learner.lr=0.01", "--set",
                   "net.hidden=[8, 8]")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# resolved from ")
    cfg = from_dict(tomllib.loads(proc.stdout))
    assert cfg == load_config("cartpole-dqn", ["learner.lr=0.01", "net.hidden=[8, 8]"])


def test_eval_prints_mean_and_std(trained: tuple[Path, str],
                                  run_cli: Callable[..., Any]) -> None:
    run_dir, _ = trained
    proc = run_cli("eval", str(run_dir), "--episodes", "3")
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"eval return (-?\d+\.\d) ± (\d+\.\d) over 3 episodes \(CartPole-v1\)",
                      proc.stdout)
    assert match, proc.stdout
    # same checkpoint, same eval seeds, same episode count: the run's own final eval
    result = json.loads((run_dir / "result.json").read_text())
    assert match.group(1) == f"{result['eval_return_mean']:.1f}"
    assert match.group(2) == f"{result['eval_return_std']:.1f}"


HAS_MOVIEPY = importlib.util.find_spec("moviepy") is not None


@pytest.mark.skipif(not HAS_MOVIEPY, reason="moviepy is not installed (RecordVideo needs it)")
def test_eval_video_writes_mp4(trained: tuple[Path, str], run_cli: Callable[..., Any],
                               tmp_path: Path) -> None:
    run_dir, _ = trained
    proc = run_cli("eval", str(run_dir), "--episodes", "1", "--video", str(tmp_path / "vid"))
    assert proc.returncode == 0, proc.stderr
    videos = list((tmp_path / "vid").glob("*.mp4"))
    assert videos and videos[0].stat().st_size > 0


@pytest.mark.skipif(HAS_MOVIEPY, reason="only meaningful without moviepy")
def test_eval_video_without_moviepy_is_a_clean_error(
        trained: tuple[Path, str], run_cli: Callable[..., Any], tmp_path: Path,
        clean_error: Callable[..., None]) -> None:
    run_dir, _ = trained
    proc = run_cli("eval", str(run_dir), "--episodes", "1", "--video", str(tmp_path / "vid"))
    clean_error(proc, "moviepy")


def test_resume_continues_counters_and_appends(trained: tuple[Path, str],
                                               run_cli: Callable[..., Any],
                                               tmp_path: Path) -> None:
    src, _ = trained
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir)
    before = read_jsonl(run_dir / "metrics.jsonl")
    old = json.loads((run_dir / "result.json").read_text())

    proc = run_cli("resume", str(run_dir), "--set", "train.total_env_steps=3100")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout

    after = read_jsonl(run_dir / "metrics.jsonl")
    assert after[: len(before)] == before  # appended, not rewritten
    new = after[len(before):]
    assert new and all(r["env_steps"] > old["env_steps"] for r in new)
    assert all(r["wall_s"] >= before[-1]["wall_s"] for r in new)  # the clock continues too
    first = next(r for r in new if r["event"] == "train")
    assert first["replay_size"] == first["env_steps"]  # the saved replay came back (n = 1)
    result = json.loads((run_dir / "result.json").read_text())
    assert 3100 <= result["env_steps"] < 3100 + 64
    assert result["updates"] == updates_owed(run_dir / "config.toml", result["env_steps"])
    assert result["updates"] > old["updates"]
    assert load_config(run_dir / "config.toml").train.total_env_steps == 3100
    _, meta, _ = checkpoint.load(checkpoint.find(run_dir))
    assert meta["env_steps"] == result["env_steps"]


def test_plot_writes_png(trained: tuple[Path, str], run_cli: Callable[..., Any],
                         tmp_path: Path) -> None:
    run_dir, _ = trained
    out = tmp_path / "plots" / "curves.png"
    proc = run_cli("plot", str(run_dir), str(run_dir), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, needles", [
    (["train", "--set", "learner.lrr=0.1"],
     ["learner.lrr", "did you mean learner.lr?", "allowed:"]),
    (["train", "--set", "learner.lr=abc"], ["learner.lr", "'abc'", "expected float"]),
    (["train", "--set", "algo.gamma=2"], ["algo.gamma", "2", "<= 1"]),
    (["train", "cartpole-dq"], ["unknown preset 'cartpole-dq'", "did you mean cartpole-dqn?"]),
    (["config", "nope"], ["unknown preset 'nope'", "available:"]),
    (["train", "--set", "env.id=envs_for_tests:ContinuousActionEnv"],
     ["envs_for_tests:ContinuousActionEnv", "not Discrete"]),
], ids=["unknown-key", "bad-value", "out-of-range", "unknown-preset", "config-unknown-preset",
        "continuous-actions"])
def test_bad_input_exits_2_without_traceback(args: list[str], needles: list[str],
                                             run_cli: Callable[..., Any], tmp_path: Path,
                                             clean_error: Callable[..., None]) -> None:
    if args[0] == "train":
        args = [*args, "--run-dir", str(tmp_path / "r")]
    proc = run_cli(*args, cwd=tmp_path)
    clean_error(proc, "qfleet: error:", *needles)
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_no_checkpoint_exits_2(command: str, run_cli: Callable[..., Any], tmp_path: Path,
                               clean_error: Callable[..., None]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    clean_error(run_cli(command, str(empty)), "no checkpoint found", str(empty))


def test_plot_of_a_non_run_exits_2(run_cli: Callable[..., Any], tmp_path: Path,
                                   clean_error: Callable[..., None]) -> None:
    clean_error(run_cli("plot", str(tmp_path), "-o", str(tmp_path / "x.png")),
                "no metrics.jsonl")
    assert not (tmp_path / "x.png").exists()


def test_malformed_toml_exits_2(run_cli: Callable[..., Any], tmp_path: Path,
                                clean_error: Callable[..., None]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner]\nlr = \n")
    clean_error(run_cli("config", str(bad)), "malformed TOML", "line 2", "column")


@pytest.mark.parametrize("case", ["section-name-in-brackets", "closing-tag-in-value"])
def test_error_text_is_printed_verbatim(case: str, run_cli: Callable[..., Any],
                                        tmp_path: Path,
                                        clean_error: Callable[..., None]) -> None:
    if case == "section-name-in-brackets":
        bad = tmp_path / "bad.toml"
        bad.write_text("learner = 3\n")
        clean_error(run_cli("config", str(bad)), "expected a [learner] table")
    else:
        clean_error(run_cli("config", "cartpole-dqn", "--set", "env.id=[/x]"),
                    "env.id = '[/x]'", "not a registered Gymnasium id")


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig, code, with_replay", [(signal.SIGINT, 130, True),
                                                (signal.SIGTERM, 143, False)],
                         ids=["SIGINT-replay-saved", "SIGTERM-no-replay"])
def test_signal_checkpoints_then_resume_continues(
        sig: signal.Signals, code: int, with_replay: bool,
        spawn_cli: Callable[..., subprocess.Popen[str]], run_cli: Callable[..., Any],
        fast_sets: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    proc = spawn_cli("train", "--run-dir", str(run_dir), name="train", sets=[
        *fast_sets, "train.total_env_steps=10000000", "checkpoint.every=0",
        "train.eval_every=0", "log.every=256", f"checkpoint.replay={str(with_replay).lower()}"])
    try:
        deadline = time.monotonic() + 180
        seen: list[dict[str, Any]] = []
        while not any(r["updates"] > 0 for r in seen):  # wait until it is really training
            assert proc.poll() is None, (tmp_path / "train.stderr").read_text()
            assert time.monotonic() < deadline, "no training metrics after 180 s"
            time.sleep(0.2)
            seen = read_jsonl(metrics) if metrics.is_file() else []
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    stderr = (tmp_path / "train.stderr").read_text()
    assert rc == code, stderr
    assert "Traceback" not in stderr
    assert f"qfleet resume {run_dir}" in stderr
    assert not (run_dir / "result.json").exists()  # it stopped early, it did not finish

    ckpt = checkpoint.find(run_dir)
    assert_checkpoint_files(ckpt)
    tensors, meta, replay = checkpoint.load(ckpt)
    assert any(k.startswith("online.") for k in tensors)
    assert bool(replay) == with_replay
    before = read_jsonl(metrics)
    assert before[-1]["env_steps"] <= meta["env_steps"] < 10_000_000
    assert meta["updates"] > 0

    target = meta["env_steps"] + 1200
    proc2 = run_cli("resume", str(run_dir), "--set", f"train.total_env_steps={target}")
    assert proc2.returncode == 0, proc2.stderr
    result = json.loads((run_dir / "result.json").read_text())
    assert target <= result["env_steps"] < target + 64
    owed = updates_owed(run_dir / "config.toml", result["env_steps"])
    assert meta["updates"] < result["updates"] <= owed
    after = read_jsonl(metrics)
    assert after[: len(before)] == before
    new = after[len(before):]
    assert new and all(r["env_steps"] > meta["env_steps"] for r in new)
    assert new[-1]["env_steps"] == result["env_steps"]
    first = next(r for r in new if r["event"] == "train")
    if with_replay:  # exactly where it stopped: replay and update count carry on
        assert result["updates"] == owed
        assert first["replay_size"] == first["env_steps"]
    else:  # the replay starts empty again (n = 1: one transition per step)
        assert first["replay_size"] == first["env_steps"] - meta["env_steps"]
