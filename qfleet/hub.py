"""``qfleet push``: a trained policy as a Hugging Face Hub model repository.

``prepare`` writes the folder (model.safetensors, config.toml, result.json, system_info.json,
replay.mp4 when the env renders, README.md: a model card with the score and the command that
trained the run); ``upload`` sends it with huggingface_hub.upload_folder (the ``hub`` extra).
``qfleet.load_policy`` reads the folder, or a snapshot_download of the repository, back.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import qfleet
from qfleet import checkpoint
from qfleet.config import ConfigError
from qfleet.errors import QfleetFailure
from qfleet.policy_io import CONFIG_FILE, MODEL_FILE, Policy, save_policy

VIDEO_FILE = "replay.mp4"
MAX_VIDEO_FRAMES = 500
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ConfigError(f"--repo {repo_id!r}: expected 'user/name' (or 'org/name')")


def check_installed() -> None:
    if importlib.util.find_spec("huggingface_hub") is None:
        raise ConfigError("qfleet push needs huggingface_hub: pip install 'qfleet[hub]' "
                          "(--no-upload prepares the folder without it)")


def run_dir_of(source: Path | None) -> Path | None:
    """The run directory a policy was loaded from (a checkpoint's RUN/checkpoints/step-*),
    or the folder itself for a prepared Hub folder."""
    if source is None:
        return None
    if source.parent.name == "checkpoints":
        return source.parent.parent
    return source


def _read_json(path: Path | None) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _score(policy: Policy, run_dir: Path | None, episodes: int) -> dict[str, Any]:
    """The run's final greedy evaluation when the loaded checkpoint is the final one; else a
    fresh one of this checkpoint (``episodes`` greedy episodes)."""
    result = _read_json(run_dir / "result.json" if run_dir else None)
    steps = None
    if policy.source is not None and (policy.source / "state.json").is_file():
        steps = checkpoint.load_meta(policy.source).get("env_steps")
    if result is not None and (steps is None or result.get("env_steps") == steps):
        return result
    from qfleet.evaluate import evaluate

    res = evaluate(policy.net, policy.config.env, episodes, policy.config.seed,
                   epsilon=policy.config.train.eval_epsilon)
    return {"eval_return_mean": res.mean, "eval_return_std": res.std,
            "eval_episodes": len(res.returns), "env_steps": steps}


def _video(policy: Policy, folder: Path) -> bool:
    """One greedy episode as replay.mp4 (cut at MAX_VIDEO_FRAMES) when the env renders
    rgb_array and moviepy is there; False otherwise."""
    from qfleet.evaluate import record_video

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "video"  # a new folder: RecordVideo warns about an existing one
        try:
            record_video(policy.net, policy.config.env, 1, policy.config.seed, where,
                         max_frames=MAX_VIDEO_FRAMES)
        except ConfigError:  # the env cannot render, or moviepy is missing
            return False
        videos = sorted(where.glob("*.mp4"))
        if not videos:
            return False
        shutil.move(str(videos[0]), folder / VIDEO_FILE)
    return True


def training_command(info: dict[str, Any] | None) -> str | None:
    """The command line system_info.json recorded, as a user would type it."""
    argv = (info or {}).get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return None
    program = Path(argv[0])
    if program.name == "qfleet" or (program.name == "__main__.py"
                                     and program.parent.name == "qfleet"):
        return shlex.join(["qfleet", *argv[1:]])
    return shlex.join(["python", *argv])


def prepare(policy: Policy, repo_id: str, folder: Path, video: bool = True,
            episodes: int = 10) -> Path:
    """Write the Hub folder for ``policy`` into ``folder`` and return it."""
    check_repo_id(repo_id)
    folder.mkdir(parents=True, exist_ok=True)
    save_policy(policy, folder)
    run_dir = run_dir_of(policy.source)
    score = _score(policy, run_dir, episodes)
    (folder / "result.json").write_text(json.dumps(score, indent=2) + "\n")
    info = _read_json(run_dir / "system_info.json" if run_dir else None)
    if info is not None:
        (folder / "system_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / VIDEO_FILE).unlink(missing_ok=True)
    has_video = video and _video(policy, folder)
    (folder / "README.md").write_text(model_card(policy, repo_id, score, info, has_video))
    return folder


def _front_matter(env_id: str, algo: str, value: str) -> str:
    """The Hub's model-index metadata, as SB3 and CleanRL cards write it."""
    tags = ("reinforcement-learning", "deep-reinforcement-learning", "qfleet", env_id, algo)
    return "\n".join([
        "---", "library_name: qfleet", "tags:", *(f"- {json.dumps(t)}" for t in tags),
        "model-index:", f"- name: {json.dumps(f'{algo.upper()} on {env_id}')}", "  results:",
        "  - task:", "      type: reinforcement-learning", "      name: reinforcement-learning",
        "    dataset:", f"      name: {json.dumps(env_id)}", f"      type: {json.dumps(env_id)}",
        "    metrics:", "    - type: mean_reward", f"      value: {json.dumps(value)}",
        "      name: mean_reward", "      verified: false", "---"])


def model_card(policy: Policy, repo_id: str, score: dict[str, Any],
               info: dict[str, Any] | None, has_video: bool) -> str:
    cfg, info = policy.config, info or {}
    env_id, algo = cfg.env.id, cfg.algo.name
    mean, std = score.get("eval_return_mean"), score.get("eval_return_std")
    value = f"{mean:.2f} +/- {std:.2f}" if mean is not None and std is not None else "unknown"
    steps, command, git = score.get("env_steps"), training_command(info), info.get("git") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (info.get("packages") or {}).items() if v)
    lines = [
        _front_matter(env_id, algo, value), "", f"# {algo.upper()} on {env_id}, trained with "
        "qfleet", "", f"Greedy return **{value}** over {score.get('eval_episodes', '?')} "
        "episodes" + (f" after {steps:,} env steps." if isinstance(steps, int) else "."), "",
        *([f"![a greedy episode]({VIDEO_FILE})", ""] if has_video else []),
        "## Use it", "", "```python", "import qfleet",
        "from huggingface_hub import snapshot_download", "",
        f'policy = qfleet.load_policy(snapshot_download("{repo_id}"))',
        "env = policy.make_env()", "obs, _ = env.reset(seed=0)",
        "obs, reward, terminated, truncated, info = env.step(policy.predict(obs))", "```", "",
        "## How it was trained", "",
        f"Command: `{command}`" if command else "Command: not recorded", "",
        f"Reproduce with the `{CONFIG_FILE}` of this repository: `qfleet train {CONFIG_FILE}`.",
        "", f"qfleet {info.get('qfleet', qfleet.__version__)}"
        + (f" (git {git.get('commit', '')[:12]})" if git else "") + f"; {versions or '?'}.",
        "", "## Files", "", f"- `{MODEL_FILE}`: the network's weights (safetensors)",
        f"- `{CONFIG_FILE}`: the run's full config", "- `result.json`: the evaluation above",
        *(["- `system_info.json`: versions, machine and command of the run"] if info else []),
        *([f"- `{VIDEO_FILE}`: one greedy episode"] if has_video else []), ""]
    return "\n".join(lines)


def upload(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the repository if needed and upload ``folder``; returns its URL. The Hub token
    comes from HF_TOKEN or `hf auth login`."""
    check_installed()
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                          commit_message="qfleet push")
    except Exception as err:  # network, auth, quota: the folder stays for a later upload
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise QfleetFailure(f"upload to the Hub repository {repo_id!r} failed "
                            f"({type(err).__name__}: {first}); the prepared folder is "
                            f"{folder}: upload it later with `hf upload {repo_id} "
                            f"{folder} .`") from None
    return str(url)
