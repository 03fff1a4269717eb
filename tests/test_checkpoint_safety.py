"""Nothing lost: checkpoints survive crashes at any point of a save, a damaged one falls
back to an older one, a failed resume changes nothing, one writer per run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from qfleet import checkpoint
from qfleet.config import Config, ConfigError
from qfleet.experiment import Experiment, resume, train
from qfleet.rundir import RunDirBusy, RunLock

REPO = Path(__file__).resolve().parent.parent


def _save(root: Path, step: int, value: float) -> Path:
    return checkpoint.save(root, step, {"w": torch.full((3,), value)}, {"env_steps": step}, {})


def _weights(ckpt: Path) -> float:
    return float(checkpoint.load(ckpt)[0]["w"][0])


# ---------------------------------------------------------------- saving


def test_the_same_state_saved_twice_is_left_alone(tmp_path: Path) -> None:
    first = _save(tmp_path, 100, 1.0)
    mtime = (first / "tensors.safetensors").stat().st_mtime_ns
    assert _save(tmp_path, 100, 1.0) == first
    assert (first / "tensors.safetensors").stat().st_mtime_ns == mtime
    assert checkpoint.steps(tmp_path) == [first]


def test_a_different_state_at_the_same_step_is_written_beside_the_old(tmp_path: Path) -> None:
    first = _save(tmp_path, 100, 1.0)
    second = _save(tmp_path, 100, 2.0)
    assert second != first and second.name == f"{first.name}-2"
    assert checkpoint.find(tmp_path) == second and _weights(second) == 2.0
    assert _weights(first) == 1.0  # the earlier one is still there, whole


def test_a_crash_while_saving_the_same_step_keeps_the_previous(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug this fixes: the old save removed step-N before renaming the new step-N
    into place, so a crash in between left `latest` naming nothing."""
    first = _save(tmp_path, 100, 1.0)

    def crash(*args: Any) -> None:
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of the save

    monkeypatch.setattr(checkpoint.os, "rename", crash)
    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 100, 2.0)
    monkeypatch.undo()
    assert checkpoint.find(tmp_path) == first and _weights(first) == 1.0
    assert _weights(_save(tmp_path, 200, 3.0)) == 3.0  # the next save clears the leftover
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_holds_the_newest_k(tmp_path: Path) -> None:
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, {"w": torch.full((1,), float(step))}, {}, {}, keep=2)
    assert [p.name for p in checkpoint.steps(tmp_path)] == ["step-000000000004",
                                                            "step-000000000005"]


def test_a_damaged_latest_falls_back_to_the_newest_loadable(tmp_path: Path) -> None:
    old, new = _save(tmp_path, 100, 1.0), _save(tmp_path, 200, 2.0)
    data = (new / "tensors.safetensors").read_bytes()
    (new / "tensors.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    value, used, skipped = checkpoint.first_loadable(tmp_path, _weights_or_error)
    assert (value, used) == (1.0, old)
    assert len(skipped) == 1 and new.name in skipped[0] and "tensors.safetensors" in skipped[0]
    (tmp_path / "latest").write_text("step-999")  # latest naming nothing at all
    assert checkpoint.first_loadable(tmp_path, _weights_or_error)[1] == old


def _weights_or_error(ckpt: Path) -> float:
    return _weights(ckpt)  # checkpoint.load raises CheckpointError for a damaged one


# ---------------------------------------------------------------- a run killed mid-save

KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import qfleet
    from qfleet import checkpoint

    point, nth = sys.argv[2], int(sys.argv[3])
    saves = {"n": 0}
    real_save_numpy = checkpoint.save_numpy

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step_written(path: Path) -> None:  # the step is in place, latest not moved
        saves["n"] += 1
        if point == "before-latest" and saves["n"] == nth:
            die()

    def save_numpy(arrays, path):  # tensors written, replay half written
        if point == "mid-write" and saves["n"] == nth - 1:
            with open(path, "wb") as fh:
                fh.write(b"partial")
            die()
        real_save_numpy(arrays, path)

    checkpoint.after_step_written = after_step_written
    checkpoint.save_numpy = save_numpy
    cfg = qfleet.load_config("cartpole-dqn", sys.argv[4:])
    qfleet.train(cfg, sys.argv[1])
""")


@pytest.mark.parametrize("point", ["before-latest", "mid-write"])
def test_sigkill_inside_a_checkpoint_write_then_resume(point: str, tmp_path: Path,
                                                       fast_sets: list[str]) -> None:
    run_dir = tmp_path / "run"
    sets = [*fast_sets, "checkpoint.every=512", "train.total_env_steps=3000",
            "checkpoint.replay=true", "train.eval_every=0"]
    proc = subprocess.run([sys.executable, "-c", KILLER, str(run_dir), point, "2", *sets],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr  # it really died at that point
    names = [p.name for p in checkpoint.steps(run_dir / "checkpoints")]
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest == "step-000000000512"  # latest never moved to the second save
    if point == "before-latest":  # the second step is whole, just not named yet
        assert names == ["step-000000000512", "step-000000001024"]
    else:  # the half-written step never got its name
        assert names == ["step-000000000512"]
        assert list((run_dir / "checkpoints").glob(".tmp-*"))
    result = resume(run_dir)
    assert result.env_steps >= 3000
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------- resume checks first


@pytest.fixture
def finished_run(make_cfg: Callable[..., Config], tmp_path: Path) -> tuple[Path, Config]:
    cfg = make_cfg("checkpoint.every=1000", "train.eval_every=0", "checkpoint.replay=true")
    train(cfg, tmp_path / "run")
    return tmp_path / "run", cfg


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_resume_that_cannot_load_changes_nothing(finished_run: tuple[Path, Config],
                                                   make_cfg: Callable[..., Config]) -> None:
    run_dir, _ = finished_run
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"learner\.optimizer"):
        resume(run_dir, make_cfg("checkpoint.every=1000", "train.eval_every=0",
                                 "learner.optimizer='rmsprop'", "train.total_env_steps=4000"))
    assert _snapshot(run_dir) == before  # config.toml, metrics, checkpoints untouched
    for ckpt in checkpoint.steps(run_dir / "checkpoints"):  # every checkpoint broken
        state = json.loads((ckpt / "state.json").read_text())
        del state["wall_s"]
        (ckpt / "state.json").write_text(json.dumps(state))
    before = _snapshot(run_dir)
    with pytest.raises(checkpoint.CheckpointError, match="wall_s"):
        resume(run_dir, make_cfg("train.total_env_steps=4000"))
    assert _snapshot(run_dir) == before


def test_resume_skips_a_damaged_latest_and_says_so(finished_run: tuple[Path, Config],
                                                  make_cfg: Callable[..., Config],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = finished_run
    latest, older = checkpoint.candidates(run_dir)[:2]
    save_file({"nonsense": torch.zeros(2)}, str(latest / "tensors.safetensors"))  # wrong
    exp = Experiment(make_cfg("checkpoint.every=1000", "train.eval_every=0"), run_dir)
    try:
        assert exp.restore_latest() == older
        assert exp.runner.env_steps == checkpoint.load_meta(older)["env_steps"]
    finally:
        exp.close()
    assert any(latest.name in note and "does not fit" in note for note in exp.notes)


def test_interrupted_before_any_checkpoint_resumes_from_scratch(
        make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg("checkpoint.every=0", "train.eval_every=0")
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    for ckpt in checkpoint.steps(run_dir / "checkpoints"):  # as a double Ctrl-C leaves it
        import shutil

        shutil.rmtree(ckpt)
    (run_dir / "checkpoints" / "latest").unlink()
    (run_dir / "result.json").unlink()
    with pytest.raises(ConfigError, match=r"stopped before its first checkpoint.*--overwrite"):
        train(cfg, run_dir)
    result = resume(run_dir)
    assert result.env_steps >= cfg.train.total_env_steps
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["env_steps"] < json.loads(lines[-1])["env_steps"]
    assert sorted(json.loads(x)["env_steps"] for x in lines if '"train"' in x) == \
        [json.loads(x)["env_steps"] for x in lines if '"train"' in x]  # one run, not two


def test_overwrite_replaces_a_run_and_a_bare_checkpoint_dir_counts_as_one(
        make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _save(run_dir / "checkpoints", 5, 1.0)  # checkpoints but no metrics.jsonl
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make_cfg(), run_dir)
    result = train(make_cfg("checkpoint.every=0"), run_dir, overwrite=True)
    assert [p.name for p in checkpoint.steps(run_dir / "checkpoints")] == \
        [f"step-{result.env_steps:012d}"]


# ---------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_with_the_holders_pid(spawn_cli: Callable[..., Any],
                                                        run_cli: Callable[..., Any],
                                                        fast_sets: list[str],
                                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = spawn_cli("train", "--run-dir", str(run_dir), name="first",
                      sets=[*fast_sets, "train.total_env_steps=100000000", "log.every=200"])
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() or \
            not (run_dir / "metrics.jsonl").read_text():
        assert first.poll() is None, (tmp_path / "first.stderr").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for args in (["train", "--run-dir", str(run_dir), "--overwrite"], ["resume", str(run_dir)]):
        second = run_cli(*args, sets=fast_sets)
        assert second.returncode == 2, second.stderr
        assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    first.kill()  # a crash: the kernel drops the lock with the process
    first.wait(timeout=30)
    after = run_cli("resume", str(run_dir), sets=["train.total_env_steps=1000"])
    assert after.returncode == 0, after.stderr


def test_lock_names_this_process_and_is_released(tmp_path: Path) -> None:
    held = RunLock(tmp_path / "run")
    with pytest.raises(RunDirBusy, match=f"PID {os.getpid()}"):
        RunLock(tmp_path / "run")
    held.release()
    RunLock(tmp_path / "run").release()
