"""``qfleet export``: a trained policy as a standalone model (ONNX or TorchScript), checked
against the PyTorch network on observations from the policy's own env.

The exported model takes a batch of network inputs ``obs`` (B, *observation shape), in the
observation dtype (uint8 frames stay uint8) after the env's wrappers and one-hot encoding,
and returns ``action`` (B,) int64 (the greedy action) and ``values`` (B, A): Q-values, or
policy logits for actor-critic schemes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qfleet.config import ConfigError, QfleetWarning
from qfleet.errors import QfleetFailure
from qfleet.policy_io import Policy

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
RTOL, ATOL = 1e-4, 1e-5  # float32 kernels differ in summation order, not more


class _Exported(nn.Module):
    """What the exported file computes: the greedy action and the values behind it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.net(obs).float()
        return values.argmax(dim=1), values


@dataclass
class ExportCheck:
    path: Path
    observations: int  # how many sample observations were compared
    max_abs_diff: float  # between the exported values and PyTorch's


def sample_observations(policy: Policy, count: int, seed: int = 0) -> np.ndarray:
    """``count`` network inputs from the policy's own env: its greedy actions with one in
    four random, so the states are the kind the policy meets and still vary."""
    rng = np.random.default_rng(seed)
    env = policy.make_env()
    try:
        out: list[np.ndarray] = []
        obs, _ = env.reset(seed=seed)
        while len(out) < count:
            out.append(np.asarray(obs))
            action = policy.predict(obs) if rng.random() > 0.25 else env.action_space.sample()
            obs, _, term, trunc, _ = env.step(int(action))
            if term or trunc:
                obs, _ = env.reset(seed=int(rng.integers(2**31)))
        return np.stack(out).astype(policy.observation_space.dtype)
    finally:
        env.close()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's exporters log and warn about their own internals (skipped torchvision ops,
    deprecated pytree helpers): nothing a user of the exported file acts on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # obs -> (actions, values)


def _onnx(model: nn.Module, example: torch.Tensor, out: Path) -> Runner:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 (torch's ONNX exporter needs it)
    except ImportError:
        raise ConfigError("--format onnx needs onnx, onnxscript and onnxruntime: "
                          "pip install 'qfleet[export]'") from None
    with _quiet_exporter():
        torch.onnx.export(model, (example,), str(out), input_names=["obs"],
                          output_names=["action", "values"], dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        actions, values = session.run(["action", "values"], {"obs": obs})
        return np.asarray(actions), np.asarray(values)

    return run


def _torchscript(model: nn.Module, example: torch.Tensor, out: Path) -> Runner:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, (example,))
        traced.save(str(out))
    if any("deprecated" in str(w.message) for w in caught):
        warnings.warn(f"torch {torch.__version__} marks TorchScript deprecated; ONNX "
                      "(--format onnx) is the format to rely on", QfleetWarning, stacklevel=3)
    loaded = torch.jit.load(str(out))

    def run(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        actions, values = loaded(torch.as_tensor(obs))
        return actions.numpy(), values.detach().numpy()

    return run


def export_policy(policy: Policy, fmt: str, out: Path, samples: int = 64) -> ExportCheck:
    """Write ``policy`` to ``out`` as ``fmt`` and check the written file: its values match
    PyTorch's within float32 tolerance and its actions are the argmax of its values, on
    ``samples`` observations (QfleetFailure if not)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    obs = sample_observations(policy, max(samples, 2))  # a batch of 1 would fix the size
    model = _Exported(copy.deepcopy(policy.net).cpu()).eval()
    example = torch.as_tensor(obs)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = (_onnx if fmt == "onnx" else _torchscript)(model, example, out)
    with torch.no_grad():
        expected = model(example)[1].numpy()
    actions, got = run(obs)
    same_shape = got.shape == expected.shape
    diff = float(np.max(np.abs(got - expected))) if same_shape else float("nan")
    if not (same_shape and np.allclose(got, expected, rtol=RTOL, atol=ATOL)):
        raise QfleetFailure(f"{out}: the exported model disagrees with PyTorch on sample "
                            f"observations (values {got.shape} vs {expected.shape}, max |diff| "
                            f"{diff:.3g}); the file was kept for inspection")
    if not np.array_equal(actions, got.argmax(axis=1)):
        raise QfleetFailure(f"{out}: the exported model's actions are not the argmax of its "
                            "values; the file was kept for inspection")
    return ExportCheck(out, len(obs), diff)
