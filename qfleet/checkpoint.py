"""Checkpoints: safetensors for tensors and arrays, JSON for everything else. No pickle.

Layout: ``checkpoints/step-<env_steps>/{state.json, tensors.safetensors[, replay.safetensors]}``
and ``checkpoints/latest`` naming the newest complete one (written last, so a crash
mid-save leaves the previous checkpoint as the latest).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

FORMAT = 1


class CheckpointError(RuntimeError):
    pass


def save(ckpt_root: Path, env_steps: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
         replay: dict[str, np.ndarray], keep: int = 3) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{env_steps:012d}"
    tmp = ckpt_root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_torch({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
               str(tmp / "tensors.safetensors"))
    if replay:
        save_numpy({k: np.ascontiguousarray(v) for k, v in replay.items()},
                   str(tmp / "replay.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **meta}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (ckpt_root / "latest.tmp").write_text(final.name)
    os.replace(ckpt_root / "latest.tmp", ckpt_root / "latest")
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find(path: Path) -> Path:
    """A run dir, a checkpoints/ dir or one checkpoint dir -> the checkpoint dir to load."""
    for root in (path / "checkpoints", path):
        if (root / "latest").is_file():
            return root / (root / "latest").read_text().strip()
    if (path / "state.json").is_file():
        return path
    raise CheckpointError(f"{path}: no checkpoint found (expected a run directory, its "
                          "checkpoints/ folder, or a step-* checkpoint folder)")


def _unreadable(ckpt: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{ckpt}: unreadable checkpoint ({err})")


def _read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta: dict[str, Any] = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise _unreadable(ckpt, err) from None
    return meta


def _check_format(ckpt: Path, meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: checkpoint format {meta.get('format')!r}, "
                              f"this qfleet reads {FORMAT}")
    return meta


def load_meta(ckpt: Path) -> dict[str, Any]:
    """Only the JSON part (config, counters) of a checkpoint, format checked."""
    return _check_format(ckpt, _read_meta(ckpt))


def load(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, np.ndarray]]:
    meta = _read_meta(ckpt)
    try:
        tensors = load_torch(str(ckpt / "tensors.safetensors"))
    except (OSError, ValueError) as err:
        raise _unreadable(ckpt, err) from None
    _check_format(ckpt, meta)
    replay_file = ckpt / "replay.safetensors"
    replay = load_numpy(str(replay_file)) if replay_file.is_file() else {}
    return tensors, meta, replay


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under ``prefix`` (e.g. "online."), with the prefix stripped."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer state_dict into tensors (safetensors) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}
