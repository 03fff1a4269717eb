"""A trained policy outside qfleet: qfleet.load_policy -> Policy.predict / make_env,
`qfleet export` (ONNX checked in ONNX Runtime, TorchScript) and `qfleet push` (the Hub folder,
read back by load_policy). The Hub itself cannot be reached from the test machines: the
upload is exercised only up to its clean failure against a closed local port."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import cli_env
from safetensors.torch import load_file

import qfleet
from qfleet import checkpoint
from qfleet.cli import main
from qfleet.config import QfleetWarning, load_config
from qfleet.envs import seeds_for
from qfleet.evaluate import EVAL_STREAM, evaluate
from qfleet.nets import make_actor_critic
from qfleet.policy_io import Policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_load_policy_takes_a_run_or_checkpoint_dir_as_str_or_path(tiny_run: Path) -> None:
    ckpt = checkpoint.find(tiny_run)
    tensors, _, _ = checkpoint.load(ckpt)
    for where in (tiny_run, str(tiny_run), ckpt, str(ckpt)):
        policy = qfleet.load_policy(where)
        assert isinstance(policy, qfleet.Policy) and policy.source == ckpt
        assert policy.config == load_config(tiny_run / "config.toml")
        for name, value in policy.net.state_dict().items():
            assert torch.equal(value, tensors[f"online.{name}"]), name


def test_predict_one_or_a_batch_is_the_greedy_action_qfleet_evaluates(tiny_run: Path) -> None:
    policy = qfleet.load_policy(tiny_run, device="cpu")
    env = policy.make_env()
    seed = seeds_for(policy.config.seed, EVAL_STREAM, 1)[0]
    obs, _ = env.reset(seed=seed)
    one = policy.predict(obs)
    assert isinstance(one, np.ndarray) and one.shape == () and one.dtype == np.int64
    batch = np.stack([obs, -obs, 2 * obs])
    actions = policy.predict(batch)
    assert actions.shape == (3,) and actions.dtype == np.int64
    with torch.no_grad():
        expected = policy.net(torch.as_tensor(batch)).argmax(dim=1).numpy()
    np.testing.assert_array_equal(actions, expected)
    assert int(one) == int(actions[0])
    # An episode stepped with predict is the greedy episode qfleet's own eval runs.
    total, done = 0.0, False
    while not done:
        obs, reward, term, trunc, _ = env.step(policy.predict(obs))
        total, done = total + float(reward), term or trunc
    assert total == evaluate(policy.net, policy.config.env, 1, policy.config.seed).returns[0]


def test_predict_names_the_expected_shape(tiny_run: Path) -> None:
    policy = qfleet.load_policy(tiny_run)
    with pytest.raises(ValueError, match=r"observation shape \(3,\): expected \(4,\)"):
        policy.predict(np.zeros(3, dtype=np.float32))


def test_sampling_follows_epsilon_or_the_softmax() -> None:
    cfg = load_config("cartpole-dqn", ["net.hidden=[8]", "actors.eps_end=1.0"])
    from qfleet.algos import build_program

    q_policy = Policy(build_program(cfg).make_eval_net(), cfg, "cpu", seed=0)
    obs = np.zeros((4000, 4), dtype=np.float32)
    greedy = q_policy.predict(obs)
    assert (greedy == greedy[0]).all()  # one observation, one greedy action
    sampled = q_policy.predict(obs, deterministic=False)  # epsilon 1: uniform
    assert abs(np.mean(sampled == 1) - 0.5) < 0.03

    ac_cfg = load_config("cartpole-a2c", ["net.hidden=[8]"])
    net = make_actor_critic(ac_cfg.net, (4,), 2)
    with torch.no_grad():  # logits log(0.2), log(0.8) whatever the observation
        net.policy.weight.zero_()
        net.policy.bias.copy_(torch.log(torch.tensor([0.2, 0.8])))
    ac_policy = Policy(net, ac_cfg, "cpu", seed=0)
    assert (ac_policy.predict(obs) == 1).all()
    assert abs(np.mean(ac_policy.predict(obs, deterministic=False) == 1) - 0.8) < 0.03


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_cuda_equals_cpu(tiny_run: Path) -> None:
    cpu, gpu = (qfleet.load_policy(tiny_run, device=d) for d in ("cpu", "cuda"))
    assert next(gpu.net.parameters()).is_cuda
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    np.testing.assert_allclose(gpu.values(obs), cpu.values(obs), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(gpu.predict(obs[0]), cpu.predict(obs[0]))


def test_export_onnx_runs_in_onnxruntime_like_pytorch(tiny_run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> \
        None:
    import onnxruntime

    out = tmp_path / "policy.onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "-o", str(out)]) == 0
    assert "matches PyTorch on 64 observations" in capsys.readouterr().out
    policy = qfleet.load_policy(tiny_run)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["obs"]
    for rows in (1, 5):  # any batch size, not only the one it was exported with
        obs = np.random.default_rng(rows).normal(size=(rows, 4)).astype(np.float32)
        actions, values = session.run(["action", "values"], {"obs": obs})
        np.testing.assert_allclose(values, policy.values(obs), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(actions, policy.predict(obs))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_export_torchscript_loads_with_torch_alone(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "policy.pt"
    with pytest.warns(QfleetWarning, match="TorchScript deprecated"):
        from qfleet.export import export_policy

        export_policy(qfleet.load_policy(tiny_run), "torchscript", out)
    model = torch.jit.load(str(out))
    obs = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    with torch.no_grad():
        actions, values = model(torch.as_tensor(obs))
    policy = qfleet.load_policy(tiny_run)
    np.testing.assert_allclose(values.numpy(), policy.values(obs), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(actions.numpy(), policy.predict(obs))


def test_export_and_push_refuse_bad_input_in_one_line(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      tiny_run: Path) -> None:
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert main(["push", str(tiny_run), "--repo", "not a repo id", "--no-upload"]) == 2
    err = capsys.readouterr().err
    assert "--repo 'not a repo id': expected 'user/name'" in err and "Traceback" not in err


def test_push_prepares_a_hub_folder_that_load_policy_reads(tiny_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) \
        -> None:
    folder = tmp_path / "hub"
    assert main(["push", str(tiny_run), "--repo", "someone/cartpole-dqn", "--no-upload",
                 "-o", str(folder)]) == 0
    assert f"Hub folder prepared: {folder}" in capsys.readouterr().out
    names = {p.name for p in folder.iterdir()}
    assert names == {"model.safetensors", "config.toml", "result.json", "system_info.json",
                     "replay.mp4", "README.md"}, names
    result = json.loads((tiny_run / "result.json").read_text())
    assert json.loads((folder / "result.json").read_text()) == result
    card = (folder / "README.md").read_text()
    score = f"{result['eval_return_mean']:.2f} +/- {result['eval_return_std']:.2f}"
    assert card.startswith("---\nlibrary_name: qfleet\n") and f'value: "{score}"' in card
    argv = json.loads((tiny_run / "system_info.json").read_text())["argv"]
    assert f"Command: `{shlex.join(['python', *argv])}`" in card  # the process that trained
    assert 'qfleet.load_policy(snapshot_download("someone/cartpole-dqn"))' in card
    assert (folder / "replay.mp4").stat().st_size > 0
    assert set(load_file(str(folder / "model.safetensors"))) == \
        set(qfleet.load_policy(tiny_run).net.state_dict())

    pushed, original = qfleet.load_policy(folder), qfleet.load_policy(tiny_run)
    assert pushed.source == folder and pushed.config == original.config
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    np.testing.assert_array_equal(pushed.values(obs), original.values(obs))


def test_push_upload_failure_is_one_line_and_keeps_the_folder(tiny_run: Path,
                                                              tmp_path: Path) -> None:
    """The upload runs for real against a closed local port (the Hub is not reachable from
    the test machines): one line naming the repo and the folder to upload later, exit 1."""
    folder = tmp_path / "hub"
    env = cli_env() | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_token",
                       "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-m", "qfleet", "push", str(tiny_run), "--repo",
                           "someone/cartpole", "--no-video", "-o", str(folder)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "upload to the Hub repository 'someone/cartpole' failed" in proc.stderr
    assert f"hf upload someone/cartpole {folder}" in proc.stderr
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()

