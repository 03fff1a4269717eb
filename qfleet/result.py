"""What ``qfleet.train`` returns and writes to ``RUN/result.json``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Result:
    eval_return_mean: float
    eval_return_std: float
    eval_episodes: int
    env_steps: int
    updates: int
    wall_s: float
    env_steps_per_s: float
    best_eval_return_mean: float
    solved_at_env_steps: int | None  # first eval >= train.target_return, if one is set
    solved_at_wall_s: float | None
    run_dir: str
    time_split: dict[str, float] = field(default_factory=dict)  # qfleet.timesplit
    time_s: dict[str, float] = field(default_factory=dict)  # the seconds behind it
    verdict: str = ""
    stopped: str = ""  # what ended it: env steps, target return, wall time, callback
