"""Checkpoints: safetensors for tensors and arrays, JSON for everything else. No pickle.

Layout: ``checkpoints/step-<env_steps>[-<rev>]/{state.json, tensors.safetensors[,
replay.safetensors]}`` and ``checkpoints/latest`` naming the newest complete one.

Nothing is deleted before its successor is safely on disk: a step is written into a hidden
folder, fsynced, renamed into place under a name no other step has, and only then does
``latest`` move (an atomic rename). A crash at any point leaves every earlier checkpoint
loadable; the last ``keep`` are kept. Saving a state that is already on disk under its
step (a Ctrl-C right after a periodic save, a finished run resumed) writes nothing new.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

FORMAT = 1
_STEP = re.compile(r"step-(\d+)(?:-(\d+))?")
# Called between renaming a finished step into place and moving ``latest`` to it; tests
# set it to kill the process at exactly that point.
after_step_written: Callable[[Path], None] | None = None

T = TypeVar("T")
V = TypeVar("V")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be read; the CLI exits with code 2."""


def _order(path: Path) -> tuple[int, int]:
    m = _STEP.fullmatch(path.name)
    assert m is not None
    return int(m.group(1)), int(m.group(2) or 1)


def steps(root: Path) -> list[Path]:
    """The complete checkpoints under ``root`` (a checkpoints/ folder), oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP.fullmatch(p.name) and p.is_dir()),
                  key=_order)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A fingerprint of the saved tensors (networks, optimizer, RNG): equal digests at one
    step mean the same training state."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _same_state(ckpt: Path, fingerprint: str) -> bool:
    try:
        return bool(json.loads((ckpt / "state.json").read_text()).get("digest") == fingerprint)
    except (OSError, ValueError, AttributeError):
        return False


def save(ckpt_root: Path, env_steps: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
         replay: dict[str, np.ndarray], keep: int = 3) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-*"):  # a save a crash interrupted
        shutil.rmtree(stale, ignore_errors=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fingerprint = digest(tensors)
    name = f"step-{env_steps:012d}"
    same = [p for p in steps(ckpt_root) if _order(p)[0] == env_steps]
    if same and _same_state(same[-1], fingerprint):
        _point_latest(ckpt_root, same[-1])
        return same[-1]
    final = ckpt_root / (f"{name}-{_order(same[-1])[1] + 1}" if same else name)
    tmp = ckpt_root / f".tmp-{final.name}"
    tmp.mkdir()
    save_torch(tensors, str(tmp / "tensors.safetensors"))
    if replay:
        save_numpy({k: np.ascontiguousarray(v) for k, v in replay.items()},
                   str(tmp / "replay.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "digest": fingerprint,
                                                **meta}))
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    os.rename(tmp, final)
    _fsync(ckpt_root)
    if after_step_written is not None:
        after_step_written(final)
    _point_latest(ckpt_root, final)
    _prune(ckpt_root, keep, final)
    return final


def _point_latest(ckpt_root: Path, ckpt: Path) -> None:
    tmp = ckpt_root / "latest.tmp"
    with tmp.open("w") as fh:
        fh.write(ckpt.name)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt_root / "latest")
    _fsync(ckpt_root)


def _prune(ckpt_root: Path, keep: int, newest: Path) -> None:
    for old in steps(ckpt_root)[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def candidates(path: Path) -> list[Path]:
    """The checkpoints under ``path`` to try, best first: the one ``latest`` names, then
    every other complete one, newest first. ``path`` is a run dir, its checkpoints/ folder
    or one checkpoint folder."""
    if (path / "state.json").is_file() and not (path / "checkpoints").is_dir():
        return [path]
    for root in (path / "checkpoints", path):
        found = steps(root)
        if found or (root / "latest").is_file():
            named = _named_by_latest(root)
            return ([named] if named in found else []) + \
                [p for p in reversed(found) if p != named]
    return []


def _named_by_latest(root: Path) -> Path | None:
    try:
        return root / (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def find(path: Path) -> Path:
    """A run dir, a checkpoints/ dir or one checkpoint dir -> the checkpoint dir to load."""
    found = candidates(path)
    if not found:
        raise CheckpointError(f"{path}: no checkpoint found (expected a run directory, its "
                              "checkpoints/ folder, or a step-* checkpoint folder)")
    return found[0]


def first_loadable(path: Path, use: Callable[[Path], T]) -> tuple[T, Path, list[str]]:
    """``use(ckpt)`` on the best checkpoint under ``path`` that it accepts (it raises
    CheckpointError for a damaged one); returns its result, the checkpoint and why each
    damaged one before it was skipped."""
    skipped: list[str] = []
    for ckpt in candidates(path):
        try:
            return use(ckpt), ckpt, skipped
        except CheckpointError as err:
            skipped.append(str(err))
    if not skipped:
        find(path)  # raises: nothing there at all
    raise CheckpointError(f"{path}: no loadable checkpoint ({'; '.join(skipped)})")


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never loaded)."""
    target, n = ckpt.with_name(f"damaged-{ckpt.name}"), 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"damaged-{ckpt.name}.{n}")
    os.rename(ckpt, target)
    return target


def _unreadable(ckpt: Path, what: str, err: Exception) -> CheckpointError:
    return CheckpointError(f"{ckpt}: unreadable {what} ({type(err).__name__}: {err})")


def _read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise _unreadable(ckpt, "state.json", err) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{ckpt}: state.json is not a JSON object")
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
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
        raise _unreadable(ckpt, "tensors.safetensors", err) from None
    _check_format(ckpt, meta)
    replay_file = ckpt / "replay.safetensors"
    try:
        replay = load_numpy(str(replay_file)) if replay_file.is_file() else {}
    except Exception as err:
        raise _unreadable(ckpt, "replay.safetensors", err) from None
    return tensors, meta, replay


def with_prefix(tensors: dict[str, V], prefix: str) -> dict[str, V]:
    """The entries saved under ``prefix`` (e.g. "online."), with the prefix stripped."""
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
