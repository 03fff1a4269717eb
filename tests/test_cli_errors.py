"""Every user-caused failure is one line and exit 2 (no traceback); a real bug keeps its
traceback; fuzzed --set values, TOML, state.json and metrics.jsonl never crash the CLI.

These call ``qfleet.cli.main`` in this process (what the ``qfleet`` command runs), so a
hundred cases cost seconds; test_cli.py runs the command itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from qfleet import checkpoint
from qfleet.cli import main
from qfleet.config import Config, load_config, to_dict

Cli = Callable[..., tuple[int, str, str]]
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=40,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> Cli:
    """``cli("eval", path)`` -> (exit code, stdout, stderr), run in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "400")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_line_error(result: tuple[int, str, str], *needles: str) -> None:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out, err
    lines = [line for line in err.splitlines() if line.startswith("qfleet: error:")]
    assert len(lines) == 1, err
    assert "qfleet resume" not in lines[0] or "resume" in needles, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run with a single checkpoint (so nothing can be fallen back to)."""
    run_dir = tmp_path_factory.mktemp("errors") / "run"
    sets = ["train.total_env_steps=1000", "learner.learning_starts=300", "log.progress=false",
            "log.tensorboard=false", "train.eval_episodes=2", "checkpoint.every=0",
            "train.eval_every=0", "checkpoint.replay=true"]
    args = ["train", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    assert main(args) == 0
    return run_dir


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the trained run, to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns(".lock"))
    yield copy


def only_ckpt(run_dir: Path) -> Path:
    (ckpt,) = checkpoint.steps(run_dir / "checkpoints")
    return ckpt


# ---------------------------------------------------------------- damaged run files


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_truncated_tensors(command: str, run: Path, cli: Cli) -> None:
    path = only_ckpt(run) / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    one_line_error(cli(command, str(run)), "tensors.safetensors", "no loadable checkpoint")


@pytest.mark.parametrize("command, needle", [("eval", "does not match its config"),
                                             ("resume", "does not fit this run")])
def test_wrong_shaped_tensors(command: str, needle: str, run: Path, cli: Cli) -> None:
    path = only_ckpt(run) / "tensors.safetensors"
    tensors = checkpoint.load(only_ckpt(run))[0]
    save_file({k: torch.zeros(v.numel() + 1) for k, v in tensors.items()}, str(path))
    one_line_error(cli(command, str(run)), needle)


def test_state_json_missing_a_key(run: Path, cli: Cli) -> None:
    state = only_ckpt(run) / "state.json"
    meta = json.loads(state.read_text())
    del meta["env_steps"]
    state.write_text(json.dumps(meta))
    one_line_error(cli("resume", str(run)), "no valid 'env_steps'")


def test_state_json_not_json(run: Path, cli: Cli) -> None:
    (only_ckpt(run) / "state.json").write_bytes(b"\xff{not json")
    one_line_error(cli("eval", str(run)), "state.json")


def test_bad_replay_file(run: Path, cli: Cli) -> None:
    (only_ckpt(run) / "replay.safetensors").write_bytes(b"garbage")
    one_line_error(cli("resume", str(run)), "replay.safetensors")


def test_garbage_and_truncated_metrics_lines_are_skipped(run: Path, cli: Cli,
                                                        tmp_path: Path) -> None:
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage \x00", *lines[1:], lines[-1][:20]]))
    code, _, err = cli("plot", str(run), "-o", str(tmp_path / "c.png"))
    assert code == 0 and "Traceback" not in err
    assert "skipped 2 unreadable line(s) (line 2, " in err
    assert (tmp_path / "c.png").stat().st_size > 5000


def test_empty_metrics(run: Path, cli: Cli, tmp_path: Path) -> None:
    (run / "metrics.jsonl").write_text("")
    one_line_error(cli("plot", str(run), "-o", str(tmp_path / "c.png")),
                   "no run has any metrics yet")
    assert "has no records yet" in cli("plot", str(run), "-o", "x.png")[2]


# ---------------------------------------------------------------- paths


def test_unwritable_run_dir(cli: Cli, tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere: /sys is a filesystem that refuses
        target = "/sys/qfleet-test-run"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = str(tmp_path / "ro" / "run")
    one_line_error(cli("train", "--run-dir", target), target)
    assert not Path(target).exists()


def test_run_dir_that_is_a_file(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    one_line_error(cli("train", "--run-dir", str(tmp_path / "afile")), "is a file")


def test_unwritable_video_path(run: Path, cli: Cli) -> None:
    blocker = run / "not-a-dir"
    blocker.write_text("x")
    one_line_error(cli("eval", str(run), "--episodes", "1", "--video", str(blocker)),
                   str(blocker))


def test_plot_output_format_and_folder(run: Path, cli: Cli, tmp_path: Path) -> None:
    one_line_error(cli("plot", str(run), "-o", "x.xyz"), "'xyz'", ".png")
    folder = tmp_path / "figs"
    folder.mkdir()
    code, out, _ = cli("plot", str(run), "-o", str(folder))
    assert code == 0 and f"{folder / 'curves.png'}" in out
    assert (folder / "curves.png").is_file()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full(run: Path, cli: Cli) -> None:
    metrics = run / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    one_line_error(cli("resume", str(run), "--set", "train.total_env_steps=2000"),
                   "No space left on device")


# ---------------------------------------------------------------- configs and envs


def test_non_utf8_toml(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_bytes(b"[learner]\nlr = 0.1 # \xe9\xff\n")
    one_line_error(cli("config", str(tmp_path / "c.toml")), "not UTF-8")


def test_empty_toml_warns_and_toml_dir_is_named(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("# nothing\n")
    code, _, err = cli("config", str(tmp_path / "empty.toml"))
    assert code == 0 and "qfleet: warning:" in err and "every field takes its default" in err
    (tmp_path / "d.toml").mkdir()
    one_line_error(cli("config", str(tmp_path / "d.toml")), "is a directory")


def test_env_module_with_a_syntax_error(cli: Cli, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_env_mod.py").write_text("class Env(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    one_line_error(cli("train", "--run-dir", "r", "--set", "env.id=broken_env_mod:Env"),
                   "broken_env_mod", "SyntaxError")
    assert not (tmp_path / "r").exists()


def test_env_error_leaves_no_run_dir(cli: Cli, tmp_path: Path) -> None:
    one_line_error(cli("train", "--run-dir", "r", "--set",
                       "env.id=envs_for_tests:ContinuousActionEnv"), "not Discrete")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(cli: Cli, tmp_path: Path) -> None:
    one_line_error(cli("train", "--run-dir", "r", "--set", "learner.device=cuda"),
                   "learner.device", "no CUDA")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting, needle", [
    ("seed=1180591620717411303424", "seed"), ("learner.lr=inf", "finite"),
    ("algo.gamma=nan", "finite"), ("learner.lr=nan", "finite"),
    ("replay.capacity=1000000000", "replay.capacity"),
    ("net.hidden=[200000, 200000]", "net.hidden")])
def test_bad_numbers_and_too_much_memory(setting: str, needle: str, cli: Cli,
                                         tmp_path: Path) -> None:
    one_line_error(cli("train", "--run-dir", "r", "--set", setting), needle)
    assert not (tmp_path / "r").exists()


def test_a_bug_keeps_its_traceback_and_no_resume_hint_without_a_run(
        run: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import qfleet.evaluate

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(qfleet.evaluate, "evaluate", broken)
    code, _, err = cli("eval", str(run))
    assert code == 1 and "Traceback" in err and "ZeroDivisionError: planted" in err
    assert "eval failed" in err and "qfleet resume" not in err


# ---------------------------------------------------------------- fuzz

KEYS = [f"{section}.{key}" if isinstance(values, dict) else section
        for section, values in to_dict(Config()).items()
        for key in (values if isinstance(values, dict) else [None])]
VALUES = st.one_of(
    st.integers(min_value=-2**80, max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(f), repr(f))),
    st.booleans().map(lambda b: str(b).lower()),
    st.lists(st.integers(-5, 10**7), max_size=3).map(str),
    st.text(max_size=12).filter(lambda t: ":" not in t and "\x00" not in t),
    st.sampled_from(["none", "[]", "{}", "'x'", '"', "1e999", "0", "-1", "[1, 'a']"]))


@FUZZ
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_fuzzed_set_values(key: str, value: str, cli: Cli) -> None:
    code, _, err = cli("config", "cartpole-dqn", "--set", f"{key}={value}")
    assert code in (0, 2) and "Traceback" not in err, err


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzzed_toml_bytes(data: bytes, cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_bytes(data)
    code, _, err = cli("config", str(tmp_path / "f.toml"))
    assert code in (0, 2) and "Traceback" not in err, err


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzzed_state_json_bytes(data: bytes, trained: Path, cli: Cli,
                                 tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(only_ckpt(trained), ckpt)
    (ckpt / "state.json").write_bytes(data)
    code, _, err = cli("eval", str(ckpt), "--episodes", "1")
    assert code in (0, 2) and "Traceback" not in err, err


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@settings(FUZZ, max_examples=25)
@given(drop=st.sets(st.sampled_from(["format", "config", "env_steps", "updates", "optimizer",
                                     "wall_s", "actors", "next", "digest"])),
       replace=st.dictionaries(st.sampled_from(["config", "env_steps", "updates", "wall_s",
                                                "recent_returns", "next", "best_eval"]),
                               JSON, max_size=2))
def test_fuzzed_state_json_fields(drop: set[str], replace: dict[str, object], trained: Path,
                                  cli: Cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "fz"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(trained, run_dir, ignore=shutil.ignore_patterns(".lock"))
    state = only_ckpt(run_dir) / "state.json"
    meta = {k: v for k, v in json.loads(state.read_text()).items() if k not in drop}
    state.write_text(json.dumps(meta | replace))
    for args in (["eval", str(run_dir), "--episodes", "1"],
                 ["resume", str(run_dir), "--set", "train.eval_episodes=1"]):
        code, _, err = cli(*args)
        assert code in (0, 2) and "Traceback" not in err, (args, err)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzzed_metrics_bytes(data: bytes, trained: Path, cli: Cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "m"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_bytes(data)
    code, _, err = cli("plot", str(run_dir), "-o", str(tmp_path / "m.png"))
    assert code in (0, 2) and "Traceback" not in err, err


def test_fuzz_keys_cover_every_field() -> None:
    assert "learner.lr" in KEYS and "seed" in KEYS and len(KEYS) > 60
    assert load_config("cartpole-dqn") is not None
    assert sys.modules.get("qfleet.cli") is not None
